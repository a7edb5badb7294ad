"""Ensemble of Behler–Parrinello networks: mean prediction and its spread (seed 004, eq. 5).

One class serves relaxation, MD and active learning: ``predict`` takes a
:class:`~xtalforge.structures.batch.Batch` of S structures and evaluates all of them in one
pass (the members share the neighbour list and descriptor work).
"""

from __future__ import annotations

import torch
from torch import nn

from xtalforge.potentials.model import BPNN, evaluate_members
from xtalforge.structures.batch import Batch, Prediction


class Ensemble(nn.Module):
    """N independently trained :class:`BPNN` models sharing elements and descriptor settings."""

    def __init__(self, members: list[BPNN], metrics: dict | None = None, config: dict | None = None):
        super().__init__()
        members = list(members)
        if not members:
            raise ValueError("an ensemble needs at least one model")
        first = members[0]
        for m in members[1:]:
            if m.elements != first.elements:
                raise ValueError(f"ensemble members disagree on elements: {first.elements} vs {m.elements}")
            if m.descriptor.params() != first.descriptor.params():
                raise ValueError("ensemble members must share descriptor settings")
            if (m.zbl, m.zbl_switch_width) != (first.zbl, first.zbl_switch_width) or not torch.equal(m.zbl_onset, first.zbl_onset):
                raise ValueError("ensemble members must share ZBL settings")
        self.members = nn.ModuleList(members)
        self.metrics: dict = metrics if metrics is not None else _mean_metrics(members)
        self.config: dict = config if config is not None else dict(first.config)

    @property
    def elements(self) -> list[str]:
        return self.members[0].elements

    @property
    def descriptor(self):
        return self.members[0].descriptor

    @property
    def dtype(self) -> torch.dtype:
        return self.members[0].dtype

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    @property
    def cutoff(self) -> float:
        return self.descriptor.cutoff

    def __len__(self) -> int:
        return len(self.members)

    def as_ensemble(self) -> Ensemble:
        return self

    # -- prediction

    def predict(self, batch: Batch, stress: bool = True, features: bool = False) -> Prediction:
        """Mean energy, forces, stress and their standard deviations over the members.

        ``uncertainty`` (S,) is U = max_i |σ_f,i| / max_i |f̄_i| per structure (seed 004,
        eq. 5); ``features`` (S, H) is the mean over atoms of the last hidden layer (seed 004,
        eq. 1), averaged over the members that share the first member's width.  Outputs are
        in the batch's dtype; stress is NaN for structures not periodic in all directions.
        """
        members = list(self.members)
        graph = members[0].graph(batch)
        with torch.no_grad():  # forces come from an inner gradient; no graph to the weights
            out = evaluate_members(members, graph, forces=True, stress=stress, hidden=features)
        dtype, device = batch.dtype, batch.device

        def mean_std(values):
            values = values.detach()
            several = len(members) > 1 and values[0].numel() > 0
            spread = values.std(0, correction=0) if several else torch.zeros_like(values[0])
            return values.mean(0).to(dtype=dtype, device=device), spread.to(dtype=dtype, device=device)

        (energy, energy_std), (forces, forces_std) = mean_std(out.energy), mean_std(out.forces)
        pred = Prediction(energy=energy, forces=forces, energy_std=energy_std, forces_std=forces_std)
        if stress:
            pred.stress, pred.stress_std = mean_std(out.stress)
        pred.uncertainty = relative_force_uncertainty(pred.forces, pred.forces_std, graph.system_idx.to(device), graph.n_systems)
        if features:
            pred.features = _mean_features(out.hidden.detach(), graph).to(dtype=dtype, device=device)
        return pred

    def atomic_features(self, batch: Batch) -> torch.Tensor:
        """Per-atom last-hidden-layer features (N, H), averaged over members (no forces computed)."""
        members = list(self.members)
        graph = members[0].graph(batch)
        with torch.no_grad():
            out = evaluate_members(members, graph, forces=False, stress=False, hidden=True)
        return out.hidden.detach().mean(0).to(dtype=batch.dtype, device=batch.device)

    def predict_atoms(self, atoms_list, stress: bool = True, features: bool = False, batch_size: int | None = None) -> Prediction:
        """:meth:`predict` for a list of ``ase.Atoms`` (optionally in chunks of ``batch_size``)."""
        from ase import Atoms

        if isinstance(atoms_list, Atoms):
            atoms_list = [atoms_list]
        atoms_list = list(atoms_list)
        if batch_size is None or len(atoms_list) <= batch_size:
            return self.predict(Batch.from_atoms(atoms_list), stress=stress, features=features)
        parts = [
            self.predict(Batch.from_atoms(atoms_list[k: k + batch_size]), stress=stress, features=features)
            for k in range(0, len(atoms_list), batch_size)
        ]
        return _concat_predictions(parts)

    def calculator(self):
        from xtalforge.potentials.calculator import NNPCalculator

        return NNPCalculator(self)

    def save(self, path) -> None:
        from xtalforge.potentials.checkpoint import save_model

        save_model(self, path)


def relative_force_uncertainty(forces: torch.Tensor, forces_std: torch.Tensor, system_idx: torch.Tensor, n_systems: int,
                               floor: float = 1e-12) -> torch.Tensor:
    """U = max_i |σ_f,i| / max(max_i |f̄_i|, floor) per structure (0 where both vanish)."""
    sigma = torch.linalg.vector_norm(forces_std, dim=1)
    force = torch.linalg.vector_norm(forces, dim=1)
    max_sigma = sigma.new_zeros(n_systems).scatter_reduce(0, system_idx, sigma, "amax", include_self=True)
    max_force = force.new_zeros(n_systems).scatter_reduce(0, system_idx, force, "amax", include_self=True)
    return max_sigma / max_force.clamp(min=floor)


def _mean_features(hidden: torch.Tensor, graph) -> torch.Tensor:
    width = hidden.shape[-1]
    n_atoms = torch.bincount(graph.system_idx, minlength=graph.n_systems).clamp(min=1).to(hidden.dtype)
    per_structure = hidden.new_zeros(hidden.shape[0], graph.n_systems, width).index_add_(1, graph.system_idx, hidden)
    per_structure = per_structure / n_atoms[None, :, None]
    return per_structure.mean(0)


def _concat_predictions(parts: list[Prediction]) -> Prediction:
    def cat(name):
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    return Prediction(**{name: cat(name) for name in Prediction.__dataclass_fields__})


def _mean_metrics(members) -> dict:
    """Per-model validation metrics and their mean over models (numbers only)."""
    per_model = [dict(m.metrics) for m in members]
    if not any(per_model):
        return {}
    out: dict = {"per_model": per_model}
    keys = {k for m in per_model for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for key in sorted(keys):
        values = [m[key] for m in per_model if isinstance(m.get(key), (int, float))]
        out[key] = sum(values) / len(values)
    return out
