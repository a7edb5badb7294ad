"""Training Behler–Parrinello potentials and ensembles.

Order of work (seed 000 II.B, seed 003 secs. 3.2–3.4 and 5, seed 004 V.A):

1. read labels; leave out structures whose largest force is more than ``force_outlier_sigma``
   standard deviations above the mean of the largest forces;
2. per-element reference energies by least squares, so the networks learn only the rest;
3. symmetry functions of every atom; per-element PCA decorrelation and whitening;
4. optionally, Gaussian-density-function weights of the atoms' force errors;
5. the shortest distance of each element pair, below which ZBL repulsion switches on;
6. per model: its own 10 % validation split and initialisation, Adam on minibatches with
   loss = Σ weight × MSE/target² + L2, learning-rate decay on plateaus, early stopping,
   and a stop as soon as all validation RMSEs are below their targets.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms
from tqdm.auto import tqdm

from xtalforge.config import PotentialConfig, to_dict
from xtalforge.errors import XtalforgeError
from xtalforge.potentials.data import frame_labels
from xtalforge.potentials.descriptors import NeighbourGraph, SymmetryFunctions
from xtalforge.potentials.ensemble import Ensemble
from xtalforge.potentials.model import BPNN, evaluate_members
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
    if config.ensemble == "replica":
        members = _train_replica_ensemble(template, data, config, n_models, seed, progress, log)
    else:
        members = [
            _train_member(template, data, config, seed, k, progress, log, label=f"model {k + 1}/{n_models}")
            for k in range(n_models)
        ]
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
    return _train_member(template, data, config, seed, 0, progress, log, label="model")


def prepare(frames: list[Atoms], config: PotentialConfig, *, seed: int = 0, log=lambda m: None) -> tuple[BPNN, TrainingSet]:
    """The training set and an untrained model carrying all fitted preprocessing."""
    labelled, n_unlabelled, n_outliers = _select_frames(frames, config.force_outlier_sigma)
    if n_unlabelled:
        log(f"{n_unlabelled} frame(s) without a finite energy left out")
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


def _select_frames(frames, outlier_sigma):
    labelled = [(atoms, frame_labels(atoms)) for atoms in frames]
    n_unlabelled = sum(lab is None for _, lab in labelled)
    labelled = [(a, lab) for a, lab in labelled if lab is not None and len(a) > 0]
    if not labelled:
        raise XtalforgeError("no frame carries an energy: label the structures with an oracle first")
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
    return labelled, n_unlabelled, n_outliers


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
    sq_e, n_e, sq_f, n_f, sq_s, n_s = totals
    metrics = {
        "energy_rmse_mev_atom": 1000.0 * math.sqrt(sq_e / max(n_e, 1.0)),
        "force_rmse_ev_a": math.sqrt(sq_f / n_f) if n_f else None,
        "stress_rmse_kbar": EV_A3_TO_KBAR * math.sqrt(sq_s / n_s) if n_s else None,
        "val_loss": float(_combine(config, *[torch.tensor(t) for t in totals])),
    }
    return metrics


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


def _train_member(template, data, config, seed, index, progress, log, label="model", hidden_layers=None) -> BPNN:
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
                   n_unlabelled=data.n_unlabelled)
    model.metrics = metrics
    log(_summary(metrics, label))
    return model


def _fit(model, train_idx, config, seed, index, make_batch, step, evaluate, progress, label, log=None) -> None:
    """Adam with minibatches, plateau LR decay, early stopping; restores the best weights."""
    rng = np.random.default_rng([seed, index, 2])
    optimizer = torch.optim.Adam(model.networks.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=config.lr_decay, patience=config.lr_patience, min_lr=config.min_lr)
    started = time.perf_counter()
    best = (math.inf, copy.deepcopy(model.networks.state_dict()), 0)
    stop_reason, epoch = "max_epochs", 0
    bar = tqdm(range(config.epochs), desc=f"training {label}", leave=False,
               disable=not progress or not sys.stderr.isatty())
    for epoch in bar:
        model.train()
        order = rng.permutation(train_idx)
        for start in range(0, len(order), config.batch_size):
            loss = step(make_batch(order[start: start + config.batch_size])) + config.l2 * _l2(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        metrics = evaluate()
        scheduler.step(metrics["val_loss"])
        if metrics["val_loss"] < best[0]:
            best = (metrics["val_loss"], copy.deepcopy(model.networks.state_dict()), epoch)
        bar.set_postfix({k.split("_")[0]: f"{v:.3g}" for k, v in metrics.items() if v is not None and k != "val_loss"})
        if log is not None and (epoch + 1) % max(1, config.epochs // 10) == 0:
            log(_summary(metrics, f"{label} epoch {epoch + 1}, lr {optimizer.param_groups[0]['lr']:.2g}"))
        if config.stop_at_targets and _targets_met(metrics, config):
            stop_reason = "targets"
            break
        if epoch - best[2] >= config.patience:
            stop_reason = "early_stopping"
            break
        if config.max_time_s is not None and time.perf_counter() - started > config.max_time_s:
            stop_reason = "time_limit"
            break
        if optimizer.param_groups[0]["lr"] <= config.min_lr * (1 + 1e-9) and epoch - best[2] >= config.lr_patience:
            stop_reason = "converged"
            break
    bar.close()
    if stop_reason != "targets":
        model.networks.load_state_dict(best[1])
    model.metrics = {"epochs": epoch + 1, "best_epoch": best[2] + 1, "stop_reason": stop_reason,
                     "train_time_s": time.perf_counter() - started}


# --------------------------------------------------------------------------- replica ensembles


def _replica_widths(hidden_layers, index: int) -> list[int]:
    """Replicas differ in size as well as initialisation (seed 003 sec. 5)."""
    factor = (0.75, 1.25, 1.0, 0.5, 1.5)[(index - 1) % 5]
    return [max(2, round(h * factor)) for h in hidden_layers]


def _train_replica_ensemble(template, data, config, n_models, seed, progress, log) -> list[BPNN]:
    """A reference network, then replicas fitted to its atomic energies (seed 003 sec. 5)."""
    reference = _train_member(template, data, config, seed, 0, progress, log, label=f"reference 1/{n_models}")
    targets = _atomic_energies(reference, data)
    return [reference] + [
        _train_replica(template, data, targets, config, seed, k, progress, log, label=f"replica {k + 1}/{n_models}")
        for k in range(1, n_models)
    ]


def _train_replica(template, data, targets, config, seed, index, progress, log, label) -> BPNN:
    """One replica of another width, trained on the reference's atomic energies (its split)."""
    replica = _member_from_template(template, config, seed, index, _replica_widths(config.hidden_layers, index))
    train_idx, val_idx = _split(len(data), config.val_fraction, seed, 0)
    monitor_idx = val_idx if len(val_idx) else train_idx
    t_e = config.target_energy_mev_atom / 1000.0

    def make_batch(idx):
        return _atom_target_batch(data, targets, idx, replica)

    def step(batch):
        out = evaluate_members([replica], batch.graph, forces=False, stress=False)
        return ((out.atomic_energies[0] - batch.atom_targets) ** 2).mean() / t_e**2

    def evaluate():
        squared, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(monitor_idx), 64):
                batch = make_batch(monitor_idx[start: start + 64])
                out = evaluate_members([replica], batch.graph, forces=False, stress=False)
                squared += float(((out.atomic_energies[0] - batch.atom_targets) ** 2).sum())
                count += len(batch.atom_targets)
        rmse = math.sqrt(squared / max(count, 1))
        return {"atomic_energy_rmse_mev": 1000 * rmse, "val_loss": (rmse / t_e) ** 2}

    _fit(replica, train_idx, config, seed, index, make_batch, step, evaluate, progress, label, log)
    metrics = validation_metrics(replica, data, monitor_idx, config)
    metrics.update(replica.metrics, n_train=len(train_idx), n_val=len(val_idx), replica_of="model 1",
                   hidden_layers=list(replica.hidden_layers), **{k: v for k, v in evaluate().items() if k != "val_loss"})
    replica.metrics = metrics
    log(_summary(metrics, label))
    return replica


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
