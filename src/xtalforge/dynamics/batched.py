"""Batched FIRE for machine-learned potentials: a whole pool relaxes together.

All structures live in one flat :class:`~xtalforge.structures.batch.Batch`; each step
costs one ``model.predict`` on the structures still active. FIRE (Bitzek et al., PRL 97,
170201 (2006)) keeps its time step, mixing parameter, positive-power counter and
velocities per structure, with the constants and update order of ``ase.optimize.FIRE``.
The cell moves as in ``ase.filters.FrechetCellFilter``: three extra "atoms" per
structure hold ``log(F) × N`` (F the deformation gradient from the initial cell, N the
number of atoms) and feel the virial mapped through the Fréchet derivative of the matrix
exponential. Batched FIRE therefore follows ASE's FIRE + FrechetCellFilter step by step.

A structure leaves the active set when it converges (forces and stress), stalls (no
enthalpy decrease for ``patience`` steps), hits ``max_steps``, becomes too uncertain
(``Prediction.uncertainty > u_max``) or fails a guard (non-finite values, absurd energy
per atom, overlapping atoms, exploding or collapsed cell). Structures never influence
each other: every reduction is per structure.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress
from tqdm.auto import tqdm

from xtalforge.config import RelaxConfig
from xtalforge.dynamics.guards import PairList, batched_cell_reasons, pair_thresholds
from xtalforge.structures.batch import Batch, Prediction

BATCH_STATUSES = ("converged", "max_steps", "stalled", "uncertain", "failed")


@dataclass(frozen=True)
class FireParameters:
    """FIRE constants; the defaults are those of ``ase.optimize.FIRE``."""

    dt: float = 0.1
    dtmax: float = 1.0
    n_min: int = 5
    finc: float = 1.1
    fdec: float = 0.5
    astart: float = 0.1
    fa: float = 0.99
    maxstep: float = 0.2  # Å (in optimizer coordinates), largest step norm per structure


@dataclass
class BatchRelaxResult:
    """Outcome for one structure of a batched relaxation. Only "failed" is unusable."""

    atoms: Atoms  # final geometry; carries a SinglePointCalculator when its values are finite
    status: str  # one of BATCH_STATUSES
    reason: str | None
    n_steps: int
    energy: float | None = None
    energy_per_atom: float | None = None
    enthalpy_per_atom: float | None = None
    fmax: float | None = None
    smax_gpa: float | None = None  # None when the cell was not relaxed
    uncertainty: float | None = None  # last U of the model, when it reports one
    energies: list[float] = field(default_factory=list)  # model energy at each step, initial first

    @property
    def ok(self) -> bool:
        return self.status != "failed"


@dataclass
class _Settings:
    fmax: float
    smax: float | None  # eV/Å³; None = fixed cell
    max_steps: int
    patience: int
    u_max: float | None
    pressure: float  # eV/Å³
    fire: FireParameters
    guards: RelaxConfig

    @property
    def relax_cell(self) -> bool:
        return self.smax is not None


@dataclass
class _State:
    """Per-structure (length S) and per-atom (length N) tensors of the active structures."""

    ids: torch.Tensor  # (S,) index into the caller's list
    numbers: torch.Tensor  # (N,)
    system_idx: torch.Tensor  # (N,)
    pbc: torch.Tensor  # (S, 3)
    x: torch.Tensor  # (N, 3) positions in the initial cell's frame (Cartesian when the cell is fixed)
    cell_dof: torch.Tensor  # (S, 3, 3) log(F) × N, FrechetCellFilter's cell coordinates
    orig_cell: torch.Tensor  # (S, 3, 3)
    v: torch.Tensor  # (N, 3) FIRE velocities of the atoms
    v_cell: torch.Tensor  # (S, 3, 3) FIRE velocities of the cell coordinates
    dt: torch.Tensor  # (S,)
    alpha: torch.Tensor  # (S,)
    n_positive: torch.Tensor  # (S,) steps since P = F·v was last negative
    best_enthalpy: torch.Tensor  # (S,)
    best_step: torch.Tensor  # (S,)
    initial_volume: torch.Tensor  # (S,)
    pairs: PairList

    PER_STRUCTURE = ("ids", "pbc", "cell_dof", "orig_cell", "v_cell", "dt", "alpha", "n_positive",
                     "best_enthalpy", "best_step", "initial_volume")
    PER_ATOM = ("numbers", "x", "v")

    @property
    def n_systems(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_atoms(self) -> torch.Tensor:
        return torch.bincount(self.system_idx, minlength=self.n_systems)

    def keep(self, keep: torch.Tensor) -> None:
        """Drop the structures where ``keep`` is False, renumbering atoms and systems."""
        keep_atoms = keep[self.system_idx]
        system_map = torch.cumsum(keep.long(), 0) - 1
        self.pairs = self.pairs.compact(keep, system_map)
        self.system_idx = system_map[self.system_idx[keep_atoms]]
        for name in self.PER_STRUCTURE:
            setattr(self, name, getattr(self, name)[keep])
        for name in self.PER_ATOM:
            setattr(self, name, getattr(self, name)[keep_atoms])


def batched_relax(
    model,
    structures: list[Atoms] | Batch,
    *,
    fmax: float = 0.05,
    smax_gpa: float | None = None,
    max_steps: int = 300,
    patience: int = 20,
    u_max: float | None = None,
    pressure_gpa: float = 0.0,
    min_distance_matrix_fn=None,
    config: RelaxConfig | None = None,
    fire: FireParameters = FireParameters(),
    progress: bool = True,
) -> list[BatchRelaxResult]:
    """Relax every structure with ``model`` (anything with ``predict(batch, stress=...)``).

    ``smax_gpa=None`` keeps cells fixed; a value relaxes cells too (FrechetCellFilter
    coordinates) and requires the stress to fall below it. ``u_max`` stops a structure
    as "uncertain" once ``Prediction.uncertainty`` exceeds it. ``min_distance_matrix_fn``
    maps a structure's atomic numbers to its (N, N) per-pair minimum distances (e.g.
    ``Constraints.min_distance_matrix``); ``config`` supplies the guard settings
    (``min_distance_factor``, ``min_distance_floor``, ``energy_bounds``,
    ``max_volume_factor``, ``max_lattice_length``). Results come back in input order.

    Per-structure trouble (NaN, guards) fails only that structure; an exception raised
    by ``model.predict`` concerns the whole batch and propagates.
    """
    batch = structures if isinstance(structures, Batch) else Batch.from_atoms(list(structures))
    batch = batch.to(dtype=torch.float64)
    if not bool(batch.pbc.all()):
        raise ValueError("batched_relax relaxes crystals: every structure must be periodic in all three directions")
    settings = _Settings(
        fmax=fmax, smax=None if smax_gpa is None else smax_gpa * units.GPa, max_steps=max_steps, patience=patience,
        u_max=u_max, pressure=pressure_gpa * units.GPa, fire=fire, guards=config or RelaxConfig(),
    )
    state = _initial_state(batch, min_distance_matrix_fn, settings.guards, fire)
    results: list[BatchRelaxResult | None] = [None] * batch.n_systems
    energy_log: list[tuple[torch.Tensor, torch.Tensor]] = []
    bar = tqdm(total=batch.n_systems, desc="batched relax", unit="structure",
               disable=not progress or not sys.stderr.isatty())
    step = 0
    while state.n_systems:
        deform = _deformation(state, settings)
        positions, cell = _geometry(state, deform)
        failed = _geometry_failures(state, positions, cell, settings.guards)
        if failed:
            _finish(results, state, positions, cell, None, failed, step, settings)
            keep = _keep_mask(state, failed)
            positions, cell, deform = positions[keep[state.system_idx]], cell[keep], deform[keep]
            state.keep(keep)
            bar.update(len(failed))
            if not state.n_systems:
                break
        prediction = model.predict(Batch(positions, state.numbers, cell, state.system_idx, state.pbc),
                                    stress=settings.relax_cell)
        if settings.relax_cell and prediction.stress is None:
            raise ValueError("the model returned no stress: pass smax_gpa=None (fixed cells) or use a model with stress")
        stops = _evaluate(state, prediction, cell, step, settings)
        _log_energies(energy_log, state.ids, prediction.energy.detach(), stops)
        if stops:
            _finish(results, state, positions, cell, prediction, stops, step, settings)
            keep = _keep_mask(state, stops)
            prediction = _select_prediction(prediction, keep, state.system_idx)
            cell, deform = cell[keep], deform[keep]
            state.keep(keep)
            bar.update(len(stops))
        if state.n_systems:
            _fire_step(state, prediction, cell, deform, step, settings)
        step += 1
        bar.set_postfix(step=step, active=state.n_systems, refresh=False)
    bar.close()
    _attach_energies(results, energy_log)
    return results


# ---------------------------------------------------------------- set-up


def _initial_state(batch: Batch, min_distance_matrix_fn, guards: RelaxConfig, fire: FireParameters) -> _State:
    n_systems = batch.n_systems
    dtype, device = batch.dtype, batch.device
    numbers_np = batch.numbers.cpu().numpy()
    bounds = np.concatenate([[0], np.cumsum(batch.n_atoms.cpu().numpy())])
    thresholds = [
        pair_thresholds(numbers_np[a:b], min_distance_matrix_fn, guards.min_distance_factor, guards.min_distance_floor)
        for a, b in itertools.pairwise(bounds)
    ]
    zeros_s = torch.zeros(n_systems, dtype=dtype, device=device)
    return _State(
        ids=torch.arange(n_systems, device=device),
        numbers=batch.numbers.clone(),
        system_idx=batch.system_idx.clone(),
        pbc=batch.pbc.clone(),
        x=batch.positions.detach().clone(),
        cell_dof=torch.zeros((n_systems, 3, 3), dtype=dtype, device=device),
        orig_cell=batch.cell.detach().clone(),
        v=torch.zeros_like(batch.positions),
        v_cell=torch.zeros((n_systems, 3, 3), dtype=dtype, device=device),
        dt=zeros_s + fire.dt,
        alpha=zeros_s + fire.astart,
        n_positive=torch.zeros(n_systems, dtype=torch.long, device=device),
        best_enthalpy=torch.full((n_systems,), torch.inf, dtype=dtype, device=device),
        best_step=torch.zeros(n_systems, dtype=torch.long, device=device),
        initial_volume=torch.linalg.det(batch.cell).abs(),
        pairs=PairList.build(batch.system_idx, thresholds),
    )


# ---------------------------------------------------------------- one step


def _deformation(state: _State, settings: _Settings) -> torch.Tensor:
    """Deformation gradient F = exp(cell_dof / N) of each structure, (S, 3, 3)."""
    if not settings.relax_cell:
        return torch.eye(3, dtype=state.x.dtype, device=state.x.device).expand(state.n_systems, 3, 3)
    n = state.n_atoms.to(state.x.dtype)[:, None, None]
    return torch.linalg.matrix_exp(state.cell_dof / n)


def _geometry(state: _State, deform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cartesian positions (x Fᵀ) and cell (cell₀ Fᵀ) of the current coordinates."""
    cell = state.orig_cell @ deform.transpose(1, 2)
    positions = torch.einsum("nj,nkj->nk", state.x, deform[state.system_idx])
    return positions, cell


def _geometry_failures(state: _State, positions, cell, guards: RelaxConfig) -> dict[int, str]:
    """Structures whose geometry fails a guard, checked before the model sees them."""
    reasons: dict[int, str] = {}
    n_atoms = state.n_atoms.to(cell.dtype)
    finite = _per_structure_all(torch.isfinite(positions).all(dim=1), state.system_idx, state.n_systems)
    checks = [(~finite, "non-finite positions")]
    checks += batched_cell_reasons(cell, n_atoms, state.initial_volume, guards.max_volume_factor,
                                   guards.max_lattice_length)
    _collect(reasons, [(mask, f"failed: {reason}") for mask, reason in checks])
    healthy = torch.ones(state.n_systems, dtype=torch.bool, device=cell.device)
    if reasons:
        healthy[torch.as_tensor(list(reasons), dtype=torch.long, device=cell.device)] = False
    # Distances only make sense in a sane cell; broken cells were caught above.
    safe_cell = torch.where(healthy[:, None, None], cell, torch.eye(3, dtype=cell.dtype, device=cell.device) * 1e3)
    offsets = torch.cumsum(state.n_atoms, 0) - state.n_atoms
    ratio = state.pairs.min_ratio(torch.nan_to_num(positions), safe_cell, offsets)
    _collect(reasons, [(healthy & (ratio < 1.0),
                        "failed: atoms closer than the minimum-distance limit (overlapping or collapsed structure)")])
    return reasons


def _evaluate(state: _State, prediction: Prediction, cell, step: int, settings: _Settings) -> dict[int, str]:
    """Update stall tracking and return {structure: reason} for those that stop now.

    The reason string starts with the status ("failed: ...", "converged", ...).
    """
    n_systems = state.n_systems
    energy = prediction.energy.detach()
    n_atoms = state.n_atoms.to(energy.dtype)
    fmax, smax = _residuals(state, prediction, settings)
    finite_forces = _per_structure_all(torch.isfinite(prediction.forces).all(dim=1), state.system_idx, n_systems)
    finite = torch.isfinite(energy) & finite_forces
    if settings.relax_cell:
        finite &= torch.isfinite(prediction.stress).flatten(1).all(dim=1)
    per_atom = energy / n_atoms
    low, high = settings.guards.energy_bounds
    enthalpy = energy + settings.pressure * torch.linalg.det(cell).abs()
    improved = enthalpy < state.best_enthalpy
    state.best_enthalpy = torch.where(improved, enthalpy, state.best_enthalpy)
    state.best_step = torch.where(improved, torch.full_like(state.best_step, step), state.best_step)

    uncertain = torch.zeros(n_systems, dtype=torch.bool, device=energy.device)
    if settings.u_max is not None and prediction.uncertainty is not None:
        uncertain = prediction.uncertainty.detach() > settings.u_max
    converged = fmax < settings.fmax
    if settings.relax_cell:
        converged &= smax < settings.smax
    stops: dict[int, str] = {}
    _collect(stops, [
        (~finite, "failed: non-finite energy, forces or stress"),
        ((per_atom < low) | (per_atom > high),
         f"failed: energy per atom outside the sanity bounds [{low:g}, {high:g}] (potential hole or collapse)"),
        (uncertain, f"uncertain: model uncertainty above u_max = {settings.u_max}"),
        (converged, "converged"),
        (step - state.best_step >= settings.patience, f"stalled: no energy decrease for {settings.patience} steps"),
        (torch.full_like(converged, step >= settings.max_steps), f"max_steps: not converged after {settings.max_steps} steps"),
    ])
    return stops


def _residuals(state: _State, prediction: Prediction, settings: _Settings) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Largest atomic force (eV/Å) and largest |stress + p| component (eV/Å³) per structure."""
    force_norm = torch.linalg.norm(prediction.forces.detach(), dim=1)
    fmax = torch.zeros(state.n_systems, dtype=force_norm.dtype, device=force_norm.device)
    fmax = fmax.scatter_reduce(0, state.system_idx, force_norm, reduce="amax", include_self=True)
    if not settings.relax_cell:
        return fmax, None
    eye = torch.eye(3, dtype=fmax.dtype, device=fmax.device)
    smax = (prediction.stress.detach() + settings.pressure * eye).abs().flatten(1).amax(dim=1)
    return fmax, smax


def _fire_step(state: _State, prediction: Prediction, cell, deform, step: int, settings: _Settings) -> None:
    """One FIRE update of every active structure (ase.optimize.FIRE.step, vectorised)."""
    p = settings.fire
    sys_idx = state.system_idx
    forces = prediction.forces.detach()
    if settings.relax_cell:
        g_atoms = torch.einsum("ni,nij->nj", forces, deform[sys_idx])  # dE/d(x) = f F
        g_cell = _cell_gradient(state, prediction, cell, deform, settings)
    else:
        g_atoms, g_cell = forces, torch.zeros_like(state.v_cell)

    if step > 0:
        vf = _dot(g_atoms, state.v, g_cell, state.v_cell, sys_idx)
        g_norm = _dot(g_atoms, g_atoms, g_cell, g_cell, sys_idx).sqrt()
        v_norm = _dot(state.v, state.v, state.v_cell, state.v_cell, sys_idx).sqrt()
        downhill = vf > 0.0
        mix = torch.where(downhill, state.alpha, torch.zeros_like(state.alpha))
        scale = mix * v_norm / torch.where(downhill, g_norm, torch.ones_like(g_norm))
        # downhill: mix velocity towards the force; uphill: stop (velocity zeroed).
        keep_v = torch.where(downhill, 1.0 - mix, torch.zeros_like(mix))
        state.v = keep_v[sys_idx, None] * state.v + scale[sys_idx, None] * g_atoms
        state.v_cell = keep_v[:, None, None] * state.v_cell + scale[:, None, None] * g_cell
        accelerate = downhill & (state.n_positive > p.n_min)
        state.dt = torch.where(accelerate, torch.clamp(state.dt * p.finc, max=p.dtmax), state.dt)
        state.alpha = torch.where(accelerate, state.alpha * p.fa, state.alpha)
        state.n_positive = torch.where(downhill, state.n_positive + 1, torch.zeros_like(state.n_positive))
        state.alpha = torch.where(downhill, state.alpha, torch.full_like(state.alpha, p.astart))
        state.dt = torch.where(downhill, state.dt, state.dt * p.fdec)

    state.v = state.v + state.dt[sys_idx, None] * g_atoms
    state.v_cell = state.v_cell + state.dt[:, None, None] * g_cell
    dr = state.dt[sys_idx, None] * state.v
    dr_cell = state.dt[:, None, None] * state.v_cell
    norm = _dot(dr, dr, dr_cell, dr_cell, sys_idx).sqrt()
    shrink = torch.where(norm > p.maxstep, p.maxstep / norm, torch.ones_like(norm))
    state.x = state.x + shrink[sys_idx, None] * dr
    if settings.relax_cell:
        state.cell_dof = state.cell_dof + shrink[:, None, None] * dr_cell


def _cell_gradient(state: _State, prediction: Prediction, cell, deform, settings: _Settings) -> torch.Tensor:
    """Force on the cell coordinates log(F) × N, as FrechetCellFilter.get_forces computes it.

    With G = virial F⁻ᵀ the force on log F is the adjoint of the Fréchet derivative
    of exp at log F applied to G, i.e. D exp(log Fᵀ)[G], read off the upper-right block
    of exp([[Lᵀ, G], [0, Lᵀ]]).
    """
    volume = torch.linalg.det(cell).abs()
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device)
    virial = -volume[:, None, None] * (prediction.stress.detach() + settings.pressure * eye)
    grad_ucf = virial @ torch.linalg.inv(deform.transpose(1, 2))
    n = state.n_atoms.to(cell.dtype)[:, None, None]
    log_t = (state.cell_dof / n).transpose(1, 2)
    block = torch.zeros((state.n_systems, 6, 6), dtype=cell.dtype, device=cell.device)
    block[:, :3, :3] = log_t
    block[:, 3:, 3:] = log_t
    block[:, :3, 3:] = grad_ucf
    return torch.linalg.matrix_exp(block)[:, :3, 3:] / n


def _dot(a_atoms, b_atoms, a_cell, b_cell, system_idx) -> torch.Tensor:
    """Per-structure dot product over atom and cell coordinates, (S,)."""
    out = (a_cell * b_cell).flatten(1).sum(dim=1)
    return out.index_add(0, system_idx, (a_atoms * b_atoms).sum(dim=1))


def _per_structure_all(flags: torch.Tensor, system_idx: torch.Tensor, n_systems: int) -> torch.Tensor:
    bad = torch.zeros(n_systems, dtype=torch.long, device=flags.device)
    bad.index_add_(0, system_idx, (~flags).long())
    return bad == 0


def _collect(reasons: dict[int, str], checks) -> None:
    """First matching reason wins: checks are listed in priority order."""
    for mask, reason in checks:
        for index in torch.nonzero(mask).flatten().tolist():
            reasons.setdefault(index, reason)


def _keep_mask(state: _State, leaving) -> torch.Tensor:
    keep = torch.ones(state.n_systems, dtype=torch.bool, device=state.x.device)
    keep[torch.as_tensor(list(leaving), dtype=torch.long, device=state.x.device)] = False
    return keep


def _select_prediction(prediction: Prediction, keep: torch.Tensor, system_idx: torch.Tensor) -> Prediction:
    keep_atoms = keep[system_idx]
    return Prediction(
        energy=prediction.energy[keep],
        forces=prediction.forces[keep_atoms],
        stress=None if prediction.stress is None else prediction.stress[keep],
    )


# ---------------------------------------------------------------- results


def _finish(results, state: _State, positions, cell, prediction: Prediction | None, stops: dict[int, str],
            step: int, settings: _Settings) -> None:
    """Write the results of the structures in ``stops`` (indices into the active set)."""
    index = torch.as_tensor(sorted(stops), dtype=torch.long, device=cell.device)
    counts = state.n_atoms[index].tolist()
    atom_mask = torch.isin(state.system_idx, index)
    pos = positions[atom_mask].detach().cpu().numpy()
    numbers = state.numbers[atom_mask].cpu().numpy()
    cells = cell[index].detach().cpu().numpy()
    pbc = state.pbc[index].cpu().numpy()
    splits = np.cumsum(counts)[:-1]
    values = _final_values(state, prediction, cell, index, atom_mask, settings)
    for k, (s, pos_s, num_s, forces_s) in enumerate(
        zip(index.tolist(), np.split(pos, splits), np.split(numbers, splits), values.pop("forces"))
    ):
        atoms = Atoms(numbers=num_s, positions=pos_s, cell=cells[k], pbc=pbc[k])
        status, _, detail = stops[s].partition(": ")
        result = BatchRelaxResult(atoms=atoms, status=status, reason=detail or None, n_steps=step)
        if prediction is not None:
            _fill(result, {name: column[k] for name, column in values.items()}, forces_s, len(num_s))
        results[int(state.ids[s])] = result


def _final_values(state, prediction, cell, index, atom_mask, settings: _Settings) -> dict:
    n = len(index)
    if prediction is None:
        return {"forces": [None] * n}
    energy = prediction.energy.detach()[index]
    fmax, smax = _residuals(state, prediction, settings)
    volume = torch.linalg.det(cell[index]).abs()
    forces = prediction.forces.detach()[atom_mask].cpu().numpy()
    out = {
        "energy": energy.cpu().numpy(),
        "enthalpy": (energy + settings.pressure * volume).cpu().numpy(),
        "fmax": fmax[index].cpu().numpy(),
        "smax": None if smax is None else (smax[index] / units.GPa).cpu().numpy(),
        "stress": None if prediction.stress is None else prediction.stress.detach()[index].cpu().numpy(),
        "uncertainty": None if prediction.uncertainty is None else prediction.uncertainty.detach()[index].cpu().numpy(),
        "forces": np.split(forces, np.cumsum(state.n_atoms[index].tolist())[:-1]),
    }
    return {k: ([None] * n if v is None else v) for k, v in out.items()}


def _fill(result: BatchRelaxResult, values: dict, forces: np.ndarray, n_atoms: int) -> None:
    energy = float(values["energy"])
    result.energy = energy
    result.energy_per_atom = energy / n_atoms
    result.enthalpy_per_atom = float(values["enthalpy"]) / n_atoms
    result.uncertainty = None if values["uncertainty"] is None else float(values["uncertainty"])
    stress = values["stress"]
    if not (np.isfinite(energy) and np.all(np.isfinite(forces)) and (stress is None or np.all(np.isfinite(stress)))):
        return
    result.fmax = float(values["fmax"])
    result.smax_gpa = None if values["smax"] is None else float(values["smax"])
    voigt = None if stress is None else full_3x3_to_voigt_6_stress(stress)
    result.atoms.calc = SinglePointCalculator(
        result.atoms, energy=energy, free_energy=energy, forces=forces, stress=voigt
    )


def _log_energies(energy_log: list, ids: torch.Tensor, energy: torch.Tensor, stops: dict[int, str]) -> None:
    """Remember this step's energies, except of structures failing at this step (as relax_structure)."""
    failed = [s for s, reason in stops.items() if reason.startswith("failed")]
    if failed:
        keep = torch.ones(len(ids), dtype=torch.bool, device=ids.device)
        keep[torch.as_tensor(failed, dtype=torch.long, device=ids.device)] = False
        ids, energy = ids[keep], energy[keep]
    energy_log.append((ids, energy))


def _attach_energies(results: list[BatchRelaxResult], energy_log) -> None:
    """Per-structure energy histories from the per-step log (one sort, no per-step loops)."""
    if not energy_log:
        return
    ids = torch.cat([i for i, _ in energy_log]).cpu()
    energies = torch.cat([e for _, e in energy_log]).cpu()
    order = torch.sort(ids, stable=True).indices
    counts = torch.bincount(ids, minlength=len(results)).tolist()
    for result, chunk in zip(results, torch.split(energies[order], counts)):
        result.energies = chunk.tolist()
