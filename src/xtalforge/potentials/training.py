"""Training Behler–Parrinello potentials and ensembles.

Order of work (seed 000 II.B, seed 003 secs. 3.2–3.4 and 5, seed 004 V.A):

1. read labels; optionally leave out structures more than ``energy_window`` eV/atom above the
   lowest of their composition; leave out structures whose largest force is more than
   ``force_outlier_sigma`` standard deviations above the mean of the largest forces;
2. per-element reference energies by least squares, so the networks learn only the rest;
3. symmetry functions of every atom; per-element PCA decorrelation and whitening;
4. optionally, Gaussian-density-function weights of the atoms' force errors;
5. the shortest distance of each element pair, below which ZBL repulsion switches on;
6. per model: its own 10 % validation split and initialisation, Adam on minibatches with
   loss = Σ weight × MSE/target² + L2, learning-rate decay on plateaus, early stopping,
   and a stop as soon as all validation RMSEs are below their targets.

The symmetry functions and their derivatives do not depend on the weights: they are computed
once per training (:class:`DescriptorCache`), and the members of an ensemble take their steps
together, each on its own minibatch, in one stacked pass (each keeps its own optimiser state,
schedule and early stopping).  Training sets too large for the cache recompute the descriptor
every step, one member after the other; both give the same training.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
from ase import Atoms
from tqdm.auto import tqdm

from xtalforge.config import PotentialConfig, to_dict
from xtalforge.errors import XtalforgeError
from xtalforge.potentials.data import frame_labels
from xtalforge.potentials.descriptors import NeighbourGraph, SymmetryFunctions
from xtalforge.potentials.ensemble import Ensemble
from xtalforge.potentials.model import BPNN, _activation_with_slope, evaluate_members
from xtalforge.structures.batch import Batch

EV_A3_TO_KBAR = 1602.1766208  # 1 eV/Å³ = 160.2 GPa


@dataclass
class TrainingSet:
    """Labelled frames with their neighbour graphs (float64) and preprocessed per-frame tensors."""

    frames: list[Atoms]
    graphs: list[NeighbourGraph]
    energy: torch.Tensor  # (F,) eV
    n_atoms: torch.Tensor  # (F,)
    forces: list[torch.Tensor]  # per frame (n, 3); zeros where missing
    has_forces: torch.Tensor  # (F,) bool
    stress: torch.Tensor  # (F, 3, 3) eV/Å³; zeros where missing
    has_stress: torch.Tensor  # (F,) bool
    elements: list[str]
    n_unlabelled: int = 0
    n_outliers: int = 0
    n_above_window: int = 0
    atom_weights: list[torch.Tensor] | None = None  # GDF weights of the force errors, per frame

    def __len__(self) -> int:
        return len(self.frames)


# --------------------------------------------------------------------------- public API


def train_ensemble(
    frames: list[Atoms],
    config: PotentialConfig | None = None,
    *,
    n_models: int | None = None,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Ensemble:
    """Train ``n_models`` (default ``config.n_models``) networks on labelled frames.

    Frames carry their labels in a SinglePointCalculator (energy, forces and optionally
    stress), as read from extxyz.  Preprocessing (reference energies, PCA, GDF weights, ZBL
    onsets) is fitted once and shared; each model gets its own initialisation and split.
    """
    config = config or PotentialConfig()
    n_models = int(n_models if n_models is not None else config.n_models)
    if n_models < 1:
        raise XtalforgeError(f"n_models = {n_models}: an ensemble needs at least one model")
    log = log or (lambda message: None)
    started = time.perf_counter()
    template, data = prepare(frames, config, seed=seed, log=log)
    cache = descriptor_cache(template, data, config, log)
    if config.ensemble == "replica":
        members = _train_replica_ensemble(template, data, config, n_models, seed, progress, log, cache)
    else:
        labels = [f"model {k + 1}/{n_models}" for k in range(n_models)]
        members = _train_members(template, data, config, seed, list(range(n_models)), progress, log, labels, cache)
    ensemble = Ensemble(members, config=to_dict(config))
    ensemble.metrics["train_time_s"] = time.perf_counter() - started
    log(_summary(ensemble.metrics, "ensemble"))
    return ensemble


def train_model(
    frames: list[Atoms],
    config: PotentialConfig | None = None,
    *,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> BPNN:
    """Train a single network (the preprocessing of :func:`train_ensemble`, one member)."""
    config = config or PotentialConfig()
    log = log or (lambda message: None)
    template, data = prepare(frames, config, seed=seed, log=log)
    cache = descriptor_cache(template, data, config, log)
    return _train_members(template, data, config, seed, [0], progress, log, ["model"], cache)[0]


def prepare(frames: list[Atoms], config: PotentialConfig, *, seed: int = 0, log=lambda m: None) -> tuple[BPNN, TrainingSet]:
    """The training set and an untrained model carrying all fitted preprocessing."""
    labelled, n_unlabelled, n_outliers, n_above_window = _select_frames(frames, config.force_outlier_sigma,
                                                                         config.energy_window)
    if n_unlabelled:
        log(f"{n_unlabelled} frame(s) without a finite energy left out")
    if n_above_window:
        log(f"{n_above_window} frame(s) more than {config.energy_window} eV/atom above the lowest of their composition left out")
    if n_outliers:
        log(f"{n_outliers} frame(s) with forces more than {config.force_outlier_sigma} σ above the mean left out (seed 004)")
    symbols = {s for atoms, _ in labelled for s in atoms.get_chemical_symbols()}
    descriptor = SymmetryFunctions.from_config(config)
    template = _new_model(symbols, descriptor, config, config.hidden_layers, torch.Generator().manual_seed(seed))
    elements = template.elements  # ordered by atomic number
    graphs = [template.graph(Batch.from_atoms([atoms])) for atoms, _ in labelled]
    data = TrainingSet(
        frames=[atoms for atoms, _ in labelled],
        graphs=graphs,
        energy=torch.tensor([lab.energy for _, lab in labelled], dtype=torch.float64),
        n_atoms=torch.tensor([len(atoms) for atoms, _ in labelled], dtype=torch.float64),
        forces=[torch.as_tensor(lab.forces if lab.forces is not None else np.zeros((len(a), 3)), dtype=torch.float64)
                for a, lab in labelled],
        has_forces=torch.tensor([lab.forces is not None for _, lab in labelled]),
        stress=torch.stack([torch.as_tensor(lab.stress if lab.stress is not None else np.zeros((3, 3)), dtype=torch.float64)
                            for _, lab in labelled]),
        has_stress=torch.tensor([lab.stress is not None for _, lab in labelled]),
        elements=elements,
        n_unlabelled=n_unlabelled,
        n_outliers=n_outliers,
        n_above_window=n_above_window,
    )
    template.set_reference_energies(reference_energies(data))
    features = _all_features(template, data)
    element = torch.cat([g.element for g in data.graphs])
    mean, transform = whitening(torch.cat(features), element, len(elements), config.pca_tol)
    template.set_whitening(mean, transform)
    if config.gdf_weighting:
        data.atom_weights = gdf_weights(features, data, template, config, np.random.default_rng(seed))
    if config.zbl:
        template.set_zbl_onset(shortest_distances(data, len(elements)))
    log(f"training set: {len(data)} frames, {int(data.n_atoms.sum())} atoms, elements {', '.join(elements)}, "
        f"{descriptor.n_features(len(elements))} symmetry functions")
    return template, data


# --------------------------------------------------------------------------- preprocessing


def _select_frames(frames, outlier_sigma, energy_window=None):
    labelled = [(atoms, frame_labels(atoms)) for atoms in frames]
    n_unlabelled = sum(lab is None for _, lab in labelled)
    labelled = [(a, lab) for a, lab in labelled if lab is not None and len(a) > 0]
    if not labelled:
        raise XtalforgeError("no frame carries an energy: label the structures with an oracle first")
    n_above_window = 0
    if energy_window is not None:
        kept = _within_energy_window(labelled, energy_window)
        n_above_window = len(labelled) - len(kept)
        labelled = kept
    n_outliers = 0
    if outlier_sigma is not None:
        max_force = np.array([np.linalg.norm(lab.forces, axis=1).max() if lab.forces is not None else np.nan
                              for _, lab in labelled])
        known = np.isfinite(max_force)
        if known.sum() > 2:
            limit = max_force[known].mean() + outlier_sigma * max_force[known].std()
            keep = ~(known & (max_force > limit))
            n_outliers = int((~keep).sum())
            labelled = [item for item, k in zip(labelled, keep) if k]
    return labelled, n_unlabelled, n_outliers, n_above_window


def _within_energy_window(labelled, window):
    """The frames at most ``window`` eV/atom above the lowest frame of the same reduced composition.

    Never fewer than the lower half of a composition's frames: early in a search every label
    may be a random structure far above the rest, and a handful of frames trains nothing.
    """
    if not window > 0:
        raise XtalforgeError(f"potential.energy_window = {window}: give a positive window in eV/atom, or leave it out to keep every frame")
    composition = np.array([atoms.symbols.formula.reduce()[0].format("metal") for atoms, _ in labelled])
    energy = np.array([lab.energy / len(atoms) for atoms, lab in labelled])
    keep = np.zeros(len(labelled), dtype=bool)
    for key in np.unique(composition):
        index = np.flatnonzero(composition == key)
        above = energy[index] - energy[index].min()
        keep[index] = above <= max(window, np.sort(above)[(len(index) - 1) // 2])
    return [item for item, k in zip(labelled, keep) if k]


def reference_energies(data: TrainingSet) -> np.ndarray:
    """Per-element energies e_Z minimising Σ_frames (E - Σ_atoms e_Z)² (least squares)."""
    index = {s: k for k, s in enumerate(data.elements)}
    counts = np.zeros((len(data), len(data.elements)))
    for f, atoms in enumerate(data.frames):
        for symbol, n in zip(*np.unique(atoms.get_chemical_symbols(), return_counts=True)):
            counts[f, index[symbol]] = n
    solution, *_ = np.linalg.lstsq(counts, data.energy.numpy(), rcond=None)
    return solution


def _all_features(model: BPNN, data: TrainingSet, chunk: int = 64) -> list[torch.Tensor]:
    """Raw symmetry functions (n, F) of every frame, float64."""
    out = []
    with torch.no_grad():
        for start in range(0, len(data), chunk):
            graphs = data.graphs[start: start + chunk]
            features = model.descriptor.features(NeighbourGraph.concat(graphs))
            out.extend(features.split([g.n_atoms for g in graphs]))
    return out


def whitening(features: torch.Tensor, element: torch.Tensor, n_elements: int, tol: float = 1e-5):
    """Per-element mean and PCA whitening matrix (seed 000; seed 003 sec. 3.2.1).

    Features are standardised first so that the eigen-decomposition is of the correlation
    matrix (symmetry functions span many orders of magnitude); directions with eigenvalue
    below ``tol`` × the largest carry only rounding noise and are dropped (zero columns).
    """
    all_features = features.to(torch.float64)
    n_feat = all_features.shape[1]
    means = torch.zeros(n_elements, n_feat, dtype=torch.float64)
    transforms = torch.zeros(n_elements, n_feat, n_feat, dtype=torch.float64)
    for e in range(n_elements):
        x = all_features[element == e]
        means[e] = x.mean(0)
        if x.shape[0] < 2:
            transforms[e] = torch.eye(n_feat, dtype=torch.float64)
            continue
        centred = x - means[e]
        std = centred.std(0)
        scale = torch.where(std > 1e-12 * std.max().clamp(min=1e-300), 1.0 / std, torch.zeros_like(std))
        z = centred * scale
        cov = z.T @ z / (x.shape[0] - 1)
        eigval, eigvec = torch.linalg.eigh(cov)
        keep = eigval > tol * eigval.max()
        columns = eigvec[:, keep] / torch.sqrt(eigval[keep])
        transforms[e][:, : int(keep.sum())] = scale[:, None] * columns
    return means, transforms


def gdf_weights(features, data: TrainingSet, model: BPNN, config: PotentialConfig, rng: np.random.Generator,
                n_reference: int = 4000) -> list[torch.Tensor]:
    """Force-loss weights Θ(1/ρ(G)) from the Gaussian density of atoms in whitened G space
    (seed 003 eqs. 4–5), normalised to mean 1 per element and capped at ``gdf_max_weight``.

    ρ is estimated against at most ``n_reference`` atoms of the same element.
    """
    element = torch.cat([g.element for g in data.graphs])
    x_all = torch.cat(features)
    weights = torch.ones(x_all.shape[0], dtype=torch.float64)
    for e in range(len(data.elements)):
        idx = torch.nonzero(element == e).flatten()
        z = (x_all[idx] - model.feature_mean[e]) @ model.feature_transform[e]
        dim = max(1, int((model.feature_transform[e].abs().sum(0) > 0).sum()))
        ref = z[torch.as_tensor(rng.choice(len(z), size=min(n_reference, len(z)), replace=False))]
        density = torch.cat([
            torch.exp(-torch.cdist(block, ref).pow(2) / (2 * config.gdf_sigma**2 * dim)).mean(1)
            for block in z.split(2048)
        ])
        weights[idx] = _normalise_capped(1.0 / density.clamp(min=1e-12), config.gdf_max_weight)
    return list(weights.split([g.n_atoms for g in data.graphs]))


def _normalise_capped(w: torch.Tensor, cap: float) -> torch.Tensor:
    """min(s·w, cap) with the scale s chosen (bisection) so that the mean is 1."""
    if cap <= 1.0:
        return torch.ones_like(w)
    lo, hi = 0.0, float(cap / w.min().clamp(min=1e-300))
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float(torch.clamp(mid * w, max=cap).mean()) < 1.0 else (lo, mid)
    return torch.clamp(hi * w, max=cap)


def shortest_distances(data: TrainingSet, n_elements: int) -> torch.Tensor:
    """(E, E) shortest distance of each element pair in the data; unseen pairs get the overall
    shortest (so that ZBL still guards them)."""
    shortest = torch.full((n_elements * n_elements,), float("inf"), dtype=torch.float64)
    for g in data.graphs:
        r = torch.linalg.vector_norm(g.vec, dim=-1)  # (N, W)
        pair = (g.element[:, None] * n_elements + g.slot_element()[None, :]).expand_as(r)
        r = torch.where(r < g.cutoff, r, torch.full_like(r, float("inf")))
        shortest = shortest.scatter_reduce(0, pair.reshape(-1), r.reshape(-1), "amin")
    shortest = shortest.view(n_elements, n_elements)
    seen = torch.isfinite(shortest)
    if not seen.any():
        return torch.zeros(n_elements, n_elements, dtype=torch.float64)
    return torch.where(seen, shortest, shortest[seen].min())


# --------------------------------------------------------------------------- training loop


def _new_model(elements, descriptor, config: PotentialConfig, hidden_layers, generator) -> BPNN:
    return BPNN(
        elements,
        SymmetryFunctions.from_params(descriptor.params()),
        hidden_layers,
        config.activation,
        zbl=config.zbl,
        zbl_switch_width=config.zbl_switch_width,
        generator=generator,
    )


def _member_from_template(template: BPNN, config: PotentialConfig, seed: int, index: int, hidden_layers=None) -> BPNN:
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))
    model = _new_model(template.elements, template.descriptor, config, hidden_layers or config.hidden_layers, generator)
    model.set_whitening(template.feature_mean, template.feature_transform)
    model.set_reference_energies(template.reference_energies)
    model.set_zbl_onset(template.zbl_onset)
    model.config = to_dict(config)
    return model.to(dtype=getattr(torch, config.dtype), device=config.device)


def _split(n_frames: int, val_fraction: float, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng([seed, index, 1]).permutation(n_frames)
    n_val = round(val_fraction * n_frames)
    if val_fraction > 0 and n_frames >= 2:
        n_val = min(max(n_val, 1), n_frames - 1)
    else:
        n_val = 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@dataclass
class _Minibatch:
    graph: NeighbourGraph
    energy: torch.Tensor
    n_atoms: torch.Tensor
    forces: torch.Tensor
    force_mask: torch.Tensor  # (n,) float: 1 where the atom has a force label (× GDF weight)
    stress: torch.Tensor
    has_stress: torch.Tensor
    atom_targets: torch.Tensor | None = None  # replicas: the reference's atomic energies


def _minibatch(data: TrainingSet, idx, dtype, device) -> _Minibatch:
    idx = [int(k) for k in idx]
    graph = NeighbourGraph.concat([data.graphs[k] for k in idx]).to(device=device, dtype=dtype)
    mask = torch.cat([torch.full((data.graphs[k].n_atoms,), float(data.has_forces[k])) for k in idx])
    if data.atom_weights is not None:
        mask = mask * torch.cat([data.atom_weights[k] for k in idx])
    return _Minibatch(
        graph=graph,
        energy=data.energy[idx].to(device=device, dtype=dtype),
        n_atoms=data.n_atoms[idx].to(device=device, dtype=dtype),
        forces=torch.cat([data.forces[k] for k in idx]).to(device=device, dtype=dtype),
        force_mask=mask.to(device=device, dtype=dtype),
        stress=data.stress[idx].to(device=device, dtype=dtype),
        has_stress=data.has_stress[idx].to(device),
    )


def _loss_terms(model: BPNN, batch: _Minibatch, create_graph: bool):
    """Sums of squared errors: energy per atom, force components, stress components; and counts."""
    need_forces = bool(batch.force_mask.any())
    need_stress = bool(batch.has_stress.any())
    out = evaluate_members([model], batch.graph, forces=need_forces, stress=need_stress, create_graph=create_graph)
    sq_e = (((out.energy[0] - batch.energy) / batch.n_atoms) ** 2).sum()
    zero = sq_e.new_zeros(())
    sq_f, n_f = zero, zero
    if need_forces:
        sq_f = (((out.forces[0] - batch.forces) ** 2).sum(-1) * batch.force_mask).sum()
        n_f = 3.0 * (batch.force_mask > 0).sum()
    sq_s, n_s = zero, zero
    if need_stress:
        stress = out.stress[0][batch.has_stress]
        sq_s = ((stress - batch.stress[batch.has_stress]) ** 2).sum()
        n_s = 9.0 * batch.has_stress.sum()
    return sq_e, float(len(batch.energy)), sq_f, n_f, sq_s, n_s


def _targets(config: PotentialConfig) -> tuple[float, float, float]:
    return config.target_energy_mev_atom / 1000.0, config.target_force_ev_a, config.target_stress_kbar / EV_A3_TO_KBAR


def _combine(config, sq_e, n_e, sq_f, n_f, sq_s, n_s):
    t_e, t_f, t_s = _targets(config)
    loss = config.energy_weight * sq_e / max(n_e, 1.0) / t_e**2
    if float(n_f) > 0:
        loss = loss + config.force_weight * sq_f / n_f / t_f**2
    if float(n_s) > 0:
        loss = loss + config.stress_weight * sq_s / n_s / t_s**2
    return loss


def validation_metrics(model, data: TrainingSet, idx, config: PotentialConfig, chunk: int = 64) -> dict:
    """RMSEs on frames ``idx``: energy (meV/atom), force components (eV/Å), stress (kbar)."""
    totals = np.zeros(6)
    model_dtype, device = model.dtype, model.device
    for start in range(0, len(idx), chunk):
        batch = _minibatch(data, idx[start: start + chunk], model_dtype, device)
        with torch.no_grad():
            terms = _loss_terms(model, batch, create_graph=False)
        totals += np.array([float(t) for t in terms])
    return _metrics(totals, config)


def _metrics(totals, config: PotentialConfig) -> dict:
    """RMSEs and validation loss from the summed squared errors and counts (6 numbers)."""
    sq_e, n_e, sq_f, n_f, sq_s, n_s = (float(t) for t in totals)
    return {
        "energy_rmse_mev_atom": 1000.0 * math.sqrt(sq_e / max(n_e, 1.0)),
        "force_rmse_ev_a": math.sqrt(sq_f / n_f) if n_f else None,
        "stress_rmse_kbar": EV_A3_TO_KBAR * math.sqrt(sq_s / n_s) if n_s else None,
        "val_loss": float(_combine(config, *[torch.tensor(float(t)) for t in totals])),
    }


def _targets_met(metrics: dict, config: PotentialConfig) -> bool:
    checks = [
        (metrics.get("energy_rmse_mev_atom"), config.target_energy_mev_atom),
        (metrics.get("force_rmse_ev_a"), config.target_force_ev_a),
        (metrics.get("stress_rmse_kbar"), config.target_stress_kbar),
        (metrics.get("atomic_energy_rmse_mev"), config.target_energy_mev_atom),  # replicas
    ]
    return all(value <= target for value, target in checks if value is not None)


def _l2(model: BPNN) -> torch.Tensor:
    return sum((p * p).sum() for name, p in model.named_parameters() if name.endswith("weight"))


def _train_members(template, data, config, seed, indices, progress, log, labels, cache) -> list[BPNN]:
    """Members ``indices`` (own initialisation and split each), all in one pass per minibatch
    on the descriptor cache, or one after the other with the descriptor recomputed."""
    if cache is None:
        return [_train_member(template, data, config, seed, k, progress, log, label) for k, label in zip(indices, labels)]
    models = [_member_from_template(template, config, seed, k) for k in indices]
    splits = [_split(len(data), config.val_fraction, seed, k) for k in indices]
    runs = [_MemberRun(model, train, config, seed, k, label, log)
            for model, (train, _), k, label in zip(models, splits, indices, labels)]
    monitors = [val if len(val) else train for train, val in splits]
    bar = tqdm(range(config.epochs), desc=f"training {len(runs)} model(s)", leave=False,
               disable=not progress or not sys.stderr.isatty())
    for epoch in bar:
        active = [k for k, run in enumerate(runs) if run.running]
        if not active:
            break
        started = time.perf_counter()
        _cached_epoch([runs[k] for k in active], cache, config)
        totals = _cached_totals([models[k] for k in active], cache, [monitors[k] for k in active])
        share = (time.perf_counter() - started) / len(active)  # each member's share of the epoch's time
        for k, member_totals in zip(active, totals):
            runs[k].end_epoch(epoch, _metrics(member_totals, config), share)
        bar.set_postfix(active=len(active))
    bar.close()
    for model, run, (train, val), monitor, label in zip(models, runs, splits, monitors, labels):
        run.finish()
        metrics = validation_metrics(model, data, monitor, config)
        metrics.update(model.metrics)
        metrics.update(n_train=len(train), n_val=len(val), n_outliers=data.n_outliers, n_unlabelled=data.n_unlabelled,
                       n_above_window=data.n_above_window)
        model.metrics = metrics
        log(_summary(metrics, label))
    return models


def _train_member(template, data, config, seed, index, progress, log, label="model", hidden_layers=None) -> BPNN:
    """One member with the descriptor recomputed every step (when the cache would be too large)."""
    model = _member_from_template(template, config, seed, index, hidden_layers)
    train_idx, val_idx = _split(len(data), config.val_fraction, seed, index)
    monitor_idx = val_idx if len(val_idx) else train_idx

    def step(batch):
        terms = _loss_terms(model, batch, create_graph=True)
        return _combine(config, *terms)

    def evaluate():
        return validation_metrics(model, data, monitor_idx, config)

    def make_batch(idx):
        return _minibatch(data, idx, model.dtype, model.device)

    _fit(model, train_idx, config, seed, index, make_batch, step, evaluate, progress, label, log)
    metrics = evaluate()
    metrics.update(model.metrics)
    metrics.update(n_train=len(train_idx), n_val=len(val_idx), n_outliers=data.n_outliers,
                   n_unlabelled=data.n_unlabelled, n_above_window=data.n_above_window)
    model.metrics = metrics
    log(_summary(metrics, label))
    return model


class _MemberRun:
    """One member's optimisation state: Adam, plateau LR decay, early stopping, best weights.

    Members trained together each keep their own; a member that stops receives no more updates.
    """

    def __init__(self, model: BPNN, train_idx, config: PotentialConfig, seed: int, index: int, label: str, log=None):
        self.model, self.train_idx, self.config, self.label, self.log = model, train_idx, config, label, log
        self.rng = np.random.default_rng([seed, index, 2])
        # foreach: one kernel per step for all parameters (the default on CPU loops over them)
        self.optimizer = torch.optim.Adam(model.networks.parameters(), lr=config.lr, foreach=True)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, factor=config.lr_decay, patience=config.lr_patience, min_lr=config.min_lr)
        self.best = (math.inf, copy.deepcopy(model.networks.state_dict()), 0)
        self.stop_reason, self.epochs, self.time_s = None, 0, 0.0

    @property
    def running(self) -> bool:
        return self.stop_reason is None

    def batches(self) -> list[np.ndarray]:
        """This epoch's minibatches (frame indices) of the member's own training split."""
        order = self.rng.permutation(self.train_idx)
        return [order[start: start + self.config.batch_size] for start in range(0, len(order), self.config.batch_size)]

    def end_epoch(self, epoch: int, metrics: dict, time_s: float) -> None:
        config = self.config
        self.epochs, self.time_s = epoch + 1, self.time_s + time_s
        self.scheduler.step(metrics["val_loss"])
        if metrics["val_loss"] < self.best[0]:
            self.best = (metrics["val_loss"], copy.deepcopy(self.model.networks.state_dict()), epoch)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.log is not None and (epoch + 1) % max(1, config.epochs // 10) == 0:
            self.log(_summary(metrics, f"{self.label} epoch {epoch + 1}, lr {lr:.2g}"))
        if config.stop_at_targets and _targets_met(metrics, config):
            self.stop_reason = "targets"
        elif epoch - self.best[2] >= config.patience:
            self.stop_reason = "early_stopping"
        elif config.max_time_s is not None and self.time_s > config.max_time_s:
            self.stop_reason = "time_limit"
        elif lr <= config.min_lr * (1 + 1e-9) and epoch - self.best[2] >= config.lr_patience:
            self.stop_reason = "converged"

    def finish(self) -> None:
        """Restore the best weights (unless the targets were met) and record how training went."""
        self.stop_reason = self.stop_reason or "max_epochs"
        if self.stop_reason != "targets":
            self.model.networks.load_state_dict(self.best[1])
        self.model.metrics = {"epochs": self.epochs, "best_epoch": self.best[2] + 1, "stop_reason": self.stop_reason,
                              "train_time_s": self.time_s}


def _fit(model, train_idx, config, seed, index, make_batch, step, evaluate, progress, label, log=None) -> None:
    """Adam with minibatches, plateau LR decay, early stopping; restores the best weights."""
    run = _MemberRun(model, train_idx, config, seed, index, label, log)
    bar = tqdm(range(config.epochs), desc=f"training {label}", leave=False,
               disable=not progress or not sys.stderr.isatty())
    for epoch in bar:
        started = time.perf_counter()
        model.train()
        for idx in run.batches():
            loss = step(make_batch(idx)) + config.l2 * _l2(model)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
        model.eval()
        metrics = evaluate()
        bar.set_postfix({k.split("_")[0]: f"{v:.3g}" for k, v in metrics.items() if v is not None and k != "val_loss"})
        run.end_epoch(epoch, metrics, time.perf_counter() - started)
        if not run.running:
            break
    bar.close()
    run.finish()

# --------------------------------------------------------------------------- descriptor cache

# Largest descriptor cache built (bytes); above it training recomputes the descriptor every step.
CACHE_LIMIT_BYTES = 1.5e9
# Numbers in the largest per-chunk arrays while building the cache, and in one validation gather.
_CHUNK_NUMBERS = 1_000_000


@dataclass
class DescriptorCache:
    """The weight-independent part of the loss of every training frame, computed once.

    A network sees atom i only through its whitened symmetry functions X_i (the first
    ``n_inputs`` columns: PCA puts dropped directions last), so with g_i = dNN/dX_i the
    energy is Σ_i NN(X_i), the force F_k = Σ_i g_i · R_ik with R_ik = -dX_i/dr_k over the
    partners k of atom i (its neighbours and itself), and the stress σ = Σ_i g_i · V_i with
    V_i = (1/V) Σ_slots vec ⊗ dX_i/dvec.  With X, R and V stored, a training step is the
    networks, their input gradients and two small contractions, and no pass over neighbours.
    Reference energies and ZBL do not depend on the weights: they are subtracted from the labels.
    The last row is a padding atom (zero features and response, its own partner).
    """

    features: torch.Tensor  # (A + 1, K) whitened symmetry functions, model dtype
    response: torch.Tensor  # (A + 1, K, 3P + 9): R to the P partners as (P, 3), then V as (3, 3)
    partners: np.ndarray  # (A + 1, P) int64 partner rows (padding: the atom itself, zero response)
    element: np.ndarray  # (A + 1,) int64
    frame_start: np.ndarray  # (F + 1,) first row of every frame
    energy: torch.Tensor  # (F,) eV: label - reference energies - ZBL
    n_atoms: torch.Tensor  # (F,)
    forces: torch.Tensor  # (A + 1, 3) eV/Å: label - ZBL
    force_weight: torch.Tensor  # (A + 1,) 1 where labelled (× GDF weight), else 0
    stress: torch.Tensor  # (F, 9) eV/Å³: label - ZBL
    has_stress: torch.Tensor  # (F,) bool
    n_elements: int

    @property
    def padding(self) -> int:
        return self.features.shape[0] - 1

    @property
    def n_partners(self) -> int:
        return self.partners.shape[1]

    @property
    def nbytes(self) -> int:
        tensors = [self.features, self.response, self.energy, self.n_atoms, self.forces, self.force_weight,
                   self.stress, self.has_stress]
        return sum(t.numel() * t.element_size() for t in tensors) + self.partners.nbytes + self.element.nbytes


def descriptor_cache(template: BPNN, data: TrainingSet, config: PotentialConfig, log=lambda m: None) -> DescriptorCache | None:
    """The cache of ``data`` for members of ``template`` (None when it would exceed CACHE_LIMIT_BYTES)."""
    dtype, device = getattr(torch, config.dtype), torch.device(config.device)
    n_inputs = _whitened_width(template)
    n_partners = max(_partner_count(g) for g in data.graphs)
    n_atoms = int(data.n_atoms.sum())
    itemsize = torch.empty(0, dtype=dtype).element_size()
    per_atom = n_inputs * (3 * n_partners + 10) * itemsize + 8 * (n_partners + 1) + 5 * itemsize
    if per_atom * n_atoms > CACHE_LIMIT_BYTES:
        log(f"descriptor cache would take {per_atom * n_atoms / 1e9:.2f} GB (limit {CACHE_LIMIT_BYTES / 1e9:.2g} GB): "
            "the descriptor is recomputed every training step")
        return None
    started = time.perf_counter()
    frame_start = np.concatenate([[0], np.cumsum([g.n_atoms for g in data.graphs])]).astype(np.int64)
    features, response, partners, zbl = _response_arrays(template, data, frame_start, n_inputs, n_partners, dtype)
    zbl_energy, zbl_forces, zbl_virial = zbl
    n_frames, sizes = len(data), torch.as_tensor(np.diff(frame_start))
    element = torch.cat([g.element for g in data.graphs]).cpu()
    reference = torch.zeros(n_frames, dtype=torch.float64).index_add_(
        0, torch.repeat_interleave(torch.arange(n_frames), sizes), template.reference_energies.cpu()[element])
    weight = torch.repeat_interleave(data.has_forces.to(torch.float64), sizes)
    if data.atom_weights is not None:
        weight = weight * torch.cat(data.atom_weights)
    periodic = torch.stack([torch.isfinite(g.volume).all() for g in data.graphs]).cpu()
    pad = torch.zeros(1, dtype=torch.float64)
    cache = DescriptorCache(
        features=features.to(device), response=response.to(device), partners=partners,
        element=np.append(element.numpy(), 0), frame_start=frame_start,
        energy=(data.energy - reference - zbl_energy).to(device=device, dtype=dtype),
        n_atoms=data.n_atoms.to(device=device, dtype=dtype),
        forces=(torch.cat([*data.forces, pad.new_zeros(1, 3)]) - zbl_forces).to(device=device, dtype=dtype),
        force_weight=torch.cat([weight, pad]).to(device=device, dtype=dtype),
        stress=(data.stress.reshape(n_frames, 9) - zbl_virial).to(device=device, dtype=dtype),
        has_stress=(data.has_stress & periodic).to(device),
        n_elements=len(template.elements),
    )
    log(f"descriptor cache: {cache.nbytes / 1e6:.0f} MB ({cache.nbytes / n_atoms / 1e3:.1f} kB per atom, "
        f"{n_inputs} inputs, {n_partners} partners), built in {time.perf_counter() - started:.1f} s")
    return cache


@torch.no_grad()
def _response_arrays(template: BPNN, data: TrainingSet, frame_start, n_inputs: int, n_partners: int, dtype):
    """Features, response and partners of every atom (plus the padding row), and the ZBL energy,
    forces and virial·(1/V) of every frame, in chunks of frames (computed in float64)."""
    n_rows, n_frames = int(frame_start[-1]) + 1, len(frame_start) - 1
    features = torch.zeros(n_rows, n_inputs, dtype=dtype)
    response = torch.zeros(n_rows, n_inputs, 3 * n_partners + 9, dtype=dtype)
    partners = np.full((n_rows, n_partners), n_rows - 1, dtype=np.int64)
    zbl_energy, zbl_virial = torch.zeros(n_frames, dtype=torch.float64), torch.zeros(n_frames, 9, dtype=torch.float64)
    zbl_forces = torch.zeros(n_rows, 3, dtype=torch.float64)
    width = max(g.width for g in data.graphs)
    chunk_atoms = max(1, _CHUNK_NUMBERS // (9 * n_inputs * width + template.n_features * n_inputs))
    for lo, hi in _frame_chunks(frame_start, chunk_atoms):
        graph = NeighbourGraph.concat(data.graphs[lo:hi]).to(device="cpu", dtype=torch.float64)
        rows = slice(int(frame_start[lo]), int(frame_start[hi]))
        x, slot_grad = _whitened_slot_gradients(template, graph, n_inputs)
        zbl = template.zbl_terms(graph)
        if zbl is not None:  # one more channel: the ZBL energy's own gradient
            slot_grad = torch.cat([slot_grad, zbl[1].transpose(1, 2)[:, None]], dim=1)
        partner_response, partner_rows = _partner_response(graph, slot_grad, n_partners)
        inverse_volume = torch.nan_to_num(1.0 / graph.volume, nan=0.0)[graph.system_idx]
        virial = torch.einsum("ncbw,nwa->ncab", slot_grad, graph.vec).flatten(2) * inverse_volume[:, None, None]
        features[rows] = x.to(dtype)
        response[rows] = torch.cat([partner_response[:, :n_inputs].flatten(2), virial[:, :n_inputs]], -1).to(dtype)
        partners[rows] = partner_rows.numpy() + rows.start
        if zbl is not None:
            zbl_energy[lo:hi] = zbl[0]
            zbl_forces.index_add_(0, partner_rows.flatten() + rows.start, partner_response[:, n_inputs].reshape(-1, 3))
            zbl_virial[lo:hi].index_add_(0, graph.system_idx, virial[:, n_inputs])
    return features, response, partners, (zbl_energy, zbl_forces, zbl_virial)


def _whitened_width(model: BPNN) -> int:
    """Columns of the whitened features any element uses (PCA puts the dropped ones last)."""
    used = torch.nonzero((model.feature_transform.abs().sum(1) > 0).any(0))
    return int(used.max()) + 1 if used.numel() else 1


def _partner_count(graph: NeighbourGraph) -> int:
    """Most distinct atoms (itself included) one atom of a one-structure graph has as neighbours."""
    n = graph.n_atoms
    occupied = torch.zeros(n, n, dtype=torch.bool).scatter_(1, graph.neighbour.cpu(), True)
    occupied.fill_diagonal_(True)
    return int(occupied.sum(1).max())


def _frame_chunks(frame_start: np.ndarray, chunk_atoms: int):
    """(first, stop) frame ranges of about ``chunk_atoms`` atoms each (at least one frame)."""
    lo, n_frames = 0, len(frame_start) - 1
    while lo < n_frames:
        hi = int(np.searchsorted(frame_start, frame_start[lo] + chunk_atoms, side="right")) - 1
        hi = min(max(hi, lo + 1), n_frames)
        yield lo, hi
        lo = hi


def _whitened_slot_gradients(model: BPNN, graph: NeighbourGraph, n_inputs: int):
    """Whitened features X (N, K) and dX/dvec (N, K, 3, W) of every atom and neighbour slot."""
    desc = model.descriptor
    mean = model.feature_mean[graph.element]  # (N, F)
    transform = model.feature_transform[graph.element][..., :n_inputs]  # (N, F, K)
    if desc.angular == "g5":  # the analytic backward pass, with the K whitened columns as "members"
        basis = desc.pair_basis(graph.vec, graph.segments)
        moments = desc.moments(basis)
        x = ((desc.features_from_moments(moments) - mean)[:, None] @ transform).squeeze(1)
        moment_grad = desc.moment_gradients(moments, transform.permute(2, 0, 1).contiguous())
        return x, desc.slot_gradients(moment_grad, basis)
    with torch.enable_grad():  # explicit triplets: one backward pass per column
        vec = graph.vec.detach().requires_grad_(True)
        features = desc.triplet_features(graph.with_vec(vec), include_jk=True)
        x = ((features - mean)[:, None] @ transform).squeeze(1)
        grads = [torch.autograd.grad(x[:, k].sum(), vec, retain_graph=k < n_inputs - 1)[0] for k in range(n_inputs)]
    return x.detach(), torch.stack(grads, dim=1).transpose(2, 3)


def _partner_response(graph: NeighbourGraph, slot_grad: torch.Tensor, n_partners: int):
    """-dX_i/dr_k (N, C, P, 3) for the partners k of every atom, and their rows (N, P) in ``graph``.

    vec = r_j - r_i: a slot's gradient counts + for its neighbour and - for the centre.
    """
    n, channels, _, width = slot_grad.shape
    sizes = torch.bincount(graph.system_idx, minlength=graph.n_systems)
    first = (torch.cumsum(sizes, 0) - sizes)[graph.system_idx]  # first row of each atom's structure
    local = graph.neighbour - first[:, None]  # (N, W) index within the structure
    own = torch.arange(n) - first
    size = int(sizes.max())
    flat = slot_grad.reshape(n, channels * 3, width)
    dense = flat.new_zeros(n, channels * 3, size).scatter_add_(2, local[:, None].expand(-1, channels * 3, -1), flat)
    dense.neg_()
    dense[torch.arange(n), :, own] += flat.sum(-1)
    occupied = torch.zeros(n, size, dtype=torch.bool).scatter_(1, local, True)
    occupied[torch.arange(n), own] = True
    order = torch.sort((~occupied).to(torch.int8), dim=1, stable=True).indices  # occupied columns first
    keep = min(size, n_partners)
    real = torch.arange(keep)[None] < occupied.sum(1, keepdim=True)
    columns = torch.where(real, order[:, :keep], own[:, None])
    response = dense.view(n, channels, 3, size).gather(3, columns[:, None, None].expand(-1, channels, 3, -1))
    response = (response * real[:, None, None]).transpose(2, 3)  # (N, C, keep, 3)
    if keep < n_partners:
        response = torch.cat([response, response.new_zeros(n, channels, n_partners - keep, 3)], dim=2)
        columns = torch.cat([columns, own[:, None].expand(-1, n_partners - keep)], dim=1)
    return response, columns + first[:, None]


@dataclass
class _Layout:
    """Where every member's minibatch sits in one stacked pass (leading dimension: member).

    Atoms are grouped by element (slots ``blocks[e]``), each block as wide as the most atoms
    of that element any member has; unused slots hold the padding atom."""

    atoms: torch.Tensor  # (M, n) cache rows
    blocks: list[tuple[int, int]]
    frame_slot: torch.Tensor  # (M·n,) row m·(B + 1) + the atom's frame in member m's batch (padding: B)
    partner_slot: torch.Tensor  # (M·n·P,) row m·(n + 1) + the slot of each partner (padding: n)
    frames: torch.Tensor  # (M, B) cache frames
    frame_mask: torch.Tensor  # (M, B) model dtype: 1 for real frames


def _frame_atoms(cache: DescriptorCache, frames) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of the atoms of ``frames``, sorted by element (stable), with their frame's position
    in ``frames`` and their element."""
    frames = np.asarray(frames, dtype=np.int64)
    sizes = cache.frame_start[frames + 1] - cache.frame_start[frames]
    atoms = np.repeat(cache.frame_start[frames] - (np.cumsum(sizes) - sizes), sizes) + np.arange(sizes.sum())
    slot = np.repeat(np.arange(len(frames)), sizes)
    element = cache.element[atoms]
    if cache.n_elements > 1:
        order = np.argsort(element, kind="stable")
        atoms, slot, element = atoms[order], slot[order], element[order]
    return atoms, slot, element


def _layout(cache: DescriptorCache, frame_lists) -> _Layout:
    """The stacked layout of one list of frames per member (index work in numpy: small arrays)."""
    n_el, n_frames = cache.n_elements, max(len(f) for f in frame_lists)
    members = []
    for frames in frame_lists:
        atoms, slot, element = _frame_atoms(cache, frames)
        members.append((atoms, slot, element, np.bincount(element, minlength=n_el)))
    widths = np.max([counts for *_, counts in members], axis=0)
    offsets = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
    n = int(offsets[-1])
    atoms_pad = np.full((len(members), n), cache.padding, dtype=np.int64)
    slot_pad = np.full((len(members), n), n_frames, dtype=np.int64)
    partner_slot = np.empty((len(members), n, cache.n_partners), dtype=np.int64)
    frames_pad = np.zeros((len(members), n_frames), dtype=np.int64)
    slot_of = np.empty(cache.padding + 1, dtype=np.int64)  # only this batch's rows are read
    for m, ((atoms, slot, element, counts), frames) in enumerate(zip(members, frame_lists)):
        position = offsets[element] + np.arange(len(atoms)) - (np.cumsum(counts) - counts)[element]
        atoms_pad[m, position], slot_pad[m, position] = atoms, slot
        slot_of[atoms_pad[m]] = np.arange(n)
        slot_of[cache.padding] = n
        partner_slot[m] = slot_of[cache.partners[atoms_pad[m]]]
        frames_pad[m, :len(frames)] = frames
    device = cache.features.device
    member = np.arange(len(members))[:, None]
    lengths = torch.tensor([len(f) for f in frame_lists])
    return _Layout(
        atoms=torch.from_numpy(atoms_pad).to(device),
        blocks=[(int(a), int(b)) for a, b in pairwise(offsets)],
        frame_slot=torch.from_numpy((slot_pad + member * (n_frames + 1)).ravel()).to(device),
        partner_slot=torch.from_numpy((partner_slot + member[:, None] * (n + 1)).ravel()).to(device),
        frames=torch.from_numpy(frames_pad).to(device),
        frame_mask=(torch.arange(n_frames)[None] < lengths[:, None]).to(device=device, dtype=cache.features.dtype),
    )


def _stacked_layers(models: list[BPNN], element: int, n_inputs: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight (M, in, out), bias (M, 1, out)) per layer of the members' networks of ``element``
    (differentiable: built from the parameters at every step)."""
    nets = [m.networks[element] for m in models]
    layers = []
    for k in range(len(nets[0].hidden)):
        weight = torch.stack([net.hidden[k].weight for net in nets]).transpose(1, 2)
        layers.append((weight[:, :n_inputs] if k == 0 else weight, torch.stack([net.hidden[k].bias for net in nets])[:, None]))
    weight = torch.stack([net.output.weight for net in nets]).transpose(1, 2)
    layers.append((weight[:, :n_inputs] if not nets[0].hidden else weight, torch.stack([net.output.bias for net in nets])[:, None]))
    return layers


def _energy_and_input_gradient(layers, activation, x: torch.Tensor, gradient: bool = True):
    """Network energies (M, n) and dE/dX (M, n, K) (None without ``gradient``), the backward pass
    written out (as in :class:`StackedNetworks`): it stays differentiable with respect to the weights."""
    *hidden, (w_out, b_out) = layers
    h, slopes = x, []
    for w, b in hidden:
        if gradient:
            h, slope = _activation_with_slope(activation, torch.baddbmm(b, h, w))
            slopes.append(slope)
        else:
            h = activation(torch.baddbmm(b, h, w))
    energy = torch.baddbmm(b_out, h, w_out).squeeze(-1)
    if not gradient:
        return energy, None
    grad = w_out.transpose(1, 2)  # (M, 1, H)
    for (w, _), slope in zip(reversed(hidden), reversed(slopes)):
        grad = torch.bmm(slope * grad, w.transpose(1, 2))
    return energy, grad.expand(-1, x.shape[1], -1)


def _cached_networks(models: list[BPNN], cache: DescriptorCache, layout: _Layout, gradient: bool = True):
    """Network energies (M, n) of the atoms of ``layout`` and, with ``gradient``, dE/dX (M, n, K)."""
    n_members, n_slots = layout.atoms.shape
    n_inputs = cache.features.shape[1]
    # index_select: several times faster than indexing with a tensor
    x = cache.features.index_select(0, layout.atoms.flatten()).view(n_members, n_slots, n_inputs)
    activation = models[0].networks[0].activation
    energies, grads = [], []
    for e, (lo, hi) in enumerate(layout.blocks):
        if hi > lo:
            layers = _stacked_layers(models, e, n_inputs)
            energy, grad = _energy_and_input_gradient(layers, activation, x[:, lo:hi], gradient)
            energies.append(energy)
            grads.append(grad)
    if len(energies) == 1:
        return energies[0], grads[0]
    return torch.cat(energies, 1), (torch.cat(grads, 1) if gradient else None)


def _cached_terms(models: list[BPNN], cache: DescriptorCache, layout: _Layout):
    """Per member (M,): squared errors and counts of energy per atom, force and stress components."""
    n_members, n_slots = layout.atoms.shape
    n_frames, n_inputs, n_partners = layout.frames.shape[1], cache.features.shape[1], cache.n_partners
    atoms, frames = layout.atoms.flatten(), layout.frames.flatten()

    def per_atom(t):
        return t.index_select(0, atoms).view(n_members, n_slots, *t.shape[1:])

    def per_frame(t):
        return t.index_select(0, frames).view(n_members, n_frames, *t.shape[1:])

    atomic, g = _cached_networks(models, cache, layout)
    response = cache.response.index_select(0, atoms)  # (M·n, K, 3P + 9)
    out = torch.bmm(g.reshape(n_members * n_slots, 1, n_inputs), response).view(n_members, n_slots, -1)
    # Sums into rows of all members at once (index_add: its backward is a fast index_select).
    forces = out.new_zeros(n_members * (n_slots + 1), 3).index_add(
        0, layout.partner_slot, out[..., :3 * n_partners].reshape(-1, 3)).view(n_members, n_slots + 1, 3)[:, :n_slots]
    stress = out.new_zeros(n_members * (n_frames + 1), 9).index_add(
        0, layout.frame_slot, out[..., 3 * n_partners:].reshape(-1, 9)).view(n_members, n_frames + 1, 9)[:, :n_frames]
    energy = atomic.new_zeros(n_members * (n_frames + 1)).index_add(
        0, layout.frame_slot, atomic.flatten()).view(n_members, n_frames + 1)[:, :n_frames]
    mask = layout.frame_mask
    sq_e = ((((energy - per_frame(cache.energy)) / per_frame(cache.n_atoms)) ** 2) * mask).sum(1)
    weight = per_atom(cache.force_weight)
    sq_f = (((forces - per_atom(cache.forces)) ** 2).sum(-1) * weight).sum(1)
    stress_mask = per_frame(cache.has_stress) * mask
    sq_s = (((stress - per_frame(cache.stress)) ** 2).sum(-1) * stress_mask).sum(1)
    return sq_e, mask.sum(1), sq_f, 3.0 * (weight > 0).sum(1), sq_s, 9.0 * stress_mask.sum(1)


def _member_losses(config: PotentialConfig, sq_e, n_e, sq_f, n_f, sq_s, n_s) -> torch.Tensor:
    """:func:`_combine` for every member at once (a term without data is 0)."""
    t_e, t_f, t_s = _targets(config)
    return (config.energy_weight * sq_e / n_e.clamp(min=1.0) / t_e**2
            + config.force_weight * sq_f / n_f.clamp(min=1.0) / t_f**2
            + config.stress_weight * sq_s / n_s.clamp(min=1.0) / t_s**2)


def _cached_epoch(runs: list[_MemberRun], cache: DescriptorCache, config: PotentialConfig) -> None:
    """One epoch of every member in ``runs``: minibatch b of all members in one pass, the sum of
    their losses differentiated once (each member's gradient is that of its own loss)."""
    batches = [run.batches() for run in runs]
    for b in range(max(len(x) for x in batches)):
        group = [run for run, x in zip(runs, batches) if b < len(x)]
        models = [run.model for run in group]
        layout = _layout(cache, [x[b] for x in batches if b < len(x)])
        loss = _member_losses(config, *_cached_terms(models, cache, layout)).sum()
        loss = loss + config.l2 * sum(_l2(model) for model in models)
        for run in group:
            run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for run in group:
            run.optimizer.step()


@torch.no_grad()
def _cached_totals(models: list[BPNN], cache: DescriptorCache, frame_lists) -> np.ndarray:
    """(M, 6) summed squared errors and counts of each member on its frames."""
    atoms_per_frame = cache.padding / max(len(cache.frame_start) - 1, 1)
    numbers_per_frame = len(models) * atoms_per_frame * cache.response[0].numel()
    chunk = max(1, int(_CHUNK_NUMBERS // max(numbers_per_frame, 1)))
    totals = np.zeros((len(models), 6))
    for start in range(0, max(len(f) for f in frame_lists), chunk):
        terms = _cached_terms(models, cache, _layout(cache, [f[start: start + chunk] for f in frame_lists]))
        totals += torch.stack(terms, dim=1).to(torch.float64).cpu().numpy()
    return totals


# --------------------------------------------------------------------------- replica ensembles


def _replica_widths(hidden_layers, index: int) -> list[int]:
    """Replicas differ in size as well as initialisation (seed 003 sec. 5)."""
    factor = (0.75, 1.25, 1.0, 0.5, 1.5)[(index - 1) % 5]
    return [max(2, round(h * factor)) for h in hidden_layers]


def _train_replica_ensemble(template, data, config, n_models, seed, progress, log, cache=None) -> list[BPNN]:
    """A reference network, then replicas fitted to its atomic energies (seed 003 sec. 5)."""
    reference = _train_members(template, data, config, seed, [0], progress, log, [f"reference 1/{n_models}"], cache)[0]
    targets = _atomic_energies(reference, data)
    return [reference] + [
        _train_replica(template, data, targets, config, seed, k, progress, log, f"replica {k + 1}/{n_models}", cache)
        for k in range(1, n_models)
    ]


def _train_replica(template, data, targets, config, seed, index, progress, log, label, cache=None) -> BPNN:
    """One replica of another width, trained on the reference's atomic energies (its split)."""
    replica = _member_from_template(template, config, seed, index, _replica_widths(config.hidden_layers, index))
    train_idx, val_idx = _split(len(data), config.val_fraction, seed, 0)
    monitor_idx = val_idx if len(val_idx) else train_idx
    t_e = config.target_energy_mev_atom / 1000.0
    make_batch, errors = _replica_errors(replica, data, targets, cache)

    def step(batch):
        return (errors(batch) ** 2).mean() / t_e**2

    def evaluate():
        squared, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(monitor_idx), 64):
                error = errors(make_batch(monitor_idx[start: start + 64]))
                squared += float((error**2).sum())
                count += error.numel()
        rmse = math.sqrt(squared / max(count, 1))
        return {"atomic_energy_rmse_mev": 1000 * rmse, "val_loss": (rmse / t_e) ** 2}

    _fit(replica, train_idx, config, seed, index, make_batch, step, evaluate, progress, label, log)
    metrics = validation_metrics(replica, data, monitor_idx, config)
    metrics.update(replica.metrics, n_train=len(train_idx), n_val=len(val_idx), replica_of="model 1",
                   hidden_layers=list(replica.hidden_layers), **{k: v for k, v in evaluate().items() if k != "val_loss"})
    replica.metrics = metrics
    log(_summary(metrics, label))
    return replica


def _replica_errors(replica: BPNN, data: TrainingSet, targets, cache: DescriptorCache | None):
    """(make_batch, errors): minibatches of frame indices, and the replica's atomic energy errors on one."""
    if cache is None:
        def errors(batch):
            out = evaluate_members([replica], batch.graph, forces=False, stress=False)
            return out.atomic_energies[0] - batch.atom_targets

        return (lambda idx: _atom_target_batch(data, targets, idx, replica)), errors
    # The cache holds network inputs: reference energies come off the targets.
    element = torch.as_tensor(cache.element[:-1])
    residual = torch.cat(targets) - replica.reference_energies.to(torch.float64).cpu()[element]
    residual = torch.cat([residual, residual.new_zeros(1)]).to(cache.features)

    def cached_errors(layout):
        atoms = layout.atoms[0]
        error = _cached_networks([replica], cache, layout, gradient=False)[0][0] - residual[atoms]
        return error[atoms != cache.padding]

    return (lambda idx: _layout(cache, [idx])), cached_errors


def _atomic_energies(model: BPNN, data: TrainingSet) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for start in range(0, len(data), 64):
            graphs = data.graphs[start: start + 64]
            graph = NeighbourGraph.concat(graphs).to(device=model.device, dtype=model.dtype)
            atomic = evaluate_members([model], graph, forces=False, stress=False).atomic_energies[0]
            out.extend(atomic.to(torch.float64).cpu().split([g.n_atoms for g in graphs]))
    return out


def _atom_target_batch(data, targets, idx, model) -> _Minibatch:
    """A minibatch carrying the reference network's atomic energies as targets."""
    batch = _minibatch(data, idx, model.dtype, model.device)
    batch.atom_targets = torch.cat([targets[int(k)] for k in idx]).to(device=model.device, dtype=model.dtype)
    return batch


def _summary(metrics: dict, label: str) -> str:
    parts = [f"{label}:"]
    if metrics.get("energy_rmse_mev_atom") is not None:
        parts.append(f"E {metrics['energy_rmse_mev_atom']:.2f} meV/atom")
    if metrics.get("force_rmse_ev_a") is not None:
        parts.append(f"F {metrics['force_rmse_ev_a']:.3f} eV/Å")
    if metrics.get("stress_rmse_kbar") is not None:
        parts.append(f"S {metrics['stress_rmse_kbar']:.2f} kbar")
    if metrics.get("stop_reason"):
        parts.append(f"({metrics['stop_reason']} after {metrics.get('epochs')} epochs)")
    return " ".join(parts) + " on validation"
