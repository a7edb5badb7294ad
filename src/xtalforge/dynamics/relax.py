"""Relaxation of one structure with an ASE calculator (the oracle): positions and cell.

ASE's FIRE, L-BFGS or BFGS move a ``FrechetCellFilter`` (positions plus the log of the
deformation gradient; the external pressure enters as an enthalpy term). The step loop
is written out here rather than hidden in observers so one iteration reads top to
bottom: geometry guards, one calculator evaluation, value guards, stop criteria, one
optimizer step. Every way a relaxation can go wrong ends it with status "failed" and a
reason string; nothing is raised.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.calculators.singlepoint import SinglePointCalculator
from ase.filters import FrechetCellFilter
from ase.io.trajectory import Trajectory
from ase.optimize import BFGS, FIRE, LBFGS
from ase.stress import full_3x3_to_voigt_6_stress, voigt_6_to_full_3x3_stress

from xtalforge.config import RelaxConfig
from xtalforge.dynamics.guards import MinDistances, check_cell, check_close_pairs, check_values, pair_thresholds
from xtalforge.oracles.counting import CountingCalculator

OPTIMIZERS = {"FIRE": FIRE, "LBFGS": LBFGS, "BFGS": BFGS}
STATUSES = ("converged", "max_steps", "stalled", "failed")


@dataclass
class RelaxResult:
    """Outcome of one relaxation. Only status "failed" is unusable for rankings."""

    atoms: Atoms  # final geometry; carries a SinglePointCalculator when its values are known
    initial: Atoms
    status: str  # one of STATUSES
    reason: str | None  # why it failed or stopped early; None when converged
    n_steps: int  # optimizer steps taken
    n_calls: int  # calculator evaluations made by this relaxation
    energy: float | None = None  # eV, final geometry
    energy_per_atom: float | None = None
    enthalpy_per_atom: float | None = None  # (E + pV) / N, equals energy_per_atom at zero pressure
    fmax: float | None = None  # eV/Å, largest atomic force
    smax_gpa: float | None = None  # GPa, largest component of stress + pressure (None without a cell)
    energies: list[float] = field(default_factory=list)  # energy after each step, initial first
    hessian: str = "identity"  # BFGS's starting Hessian: "identity" (ASE's), or "model" (see hessian_model)

    @property
    def ok(self) -> bool:
        return self.status != "failed"


@dataclass
class _Criteria:
    fmax: float
    smax_gpa: float
    max_steps: int
    patience: int
    optimizer: str


@dataclass
class _Snapshot:
    """Calculator values at the current geometry."""

    energy: float
    forces: np.ndarray  # (N, 3)
    stress: np.ndarray | None  # (3, 3) eV/Å³, None when the cell is not relaxed


def relax_structure(
    atoms: Atoms,
    calculator: Calculator,
    config: RelaxConfig | None = None,
    *,
    pressure_gpa: float = 0.0,
    validation: bool = False,
    min_distances: MinDistances = None,
    trajectory=None,
    log=None,
    hessian_model: Calculator | None = None,
) -> RelaxResult:
    """Relax positions and cell of ``atoms`` (not modified) with ``calculator``.

    Stops when the largest force is below ``fmax`` and the largest stress component
    (relative to the external pressure) below ``smax_gpa`` ("converged"), when the
    enthalpy has not decreased for ``patience`` steps ("stalled"), after ``max_steps``
    ("max_steps"), or when a guard fires ("failed": overlapping atoms, exploding cell,
    non-finite or absurd values, a calculator exception). ``validation=True`` uses the
    tighter validation thresholds, step limit and optimizer of ``config``.

    ``min_distances`` is the per-atom-pair minimum-distance matrix (N, N) of the
    generation constraints, or a callable ``numbers -> matrix``; a pair fails below
    ``config.min_distance_factor`` × its minimum, and any pair below
    ``config.min_distance_floor``. ``trajectory`` is a path or an open ASE Trajectory
    that receives every evaluated geometry; ``log`` is a path, ``"-"`` (stdout) or a
    file-like object that receives one line per step. ``hessian_model`` (a cheap calculator,
    BFGS only) supplies BFGS's starting Hessian (:func:`~xtalforge.dynamics.hessian.model_hessian`);
    ``RelaxResult.hessian`` says whether it was used.
    """
    config = config or RelaxConfig()
    criteria = _criteria(config, validation)
    initial = atoms.copy()
    initial.calc = None
    work = atoms.copy()
    counted, calls_before = _counted(calculator)
    work.calc = counted
    target = optimizer_target(work, pressure_gpa)
    relax_cell = target is not work
    pressure = pressure_gpa * units.GPa
    optimizer = OPTIMIZERS[criteria.optimizer](target, logfile=None)
    hessian = _start_hessian(optimizer, work, hessian_model, pressure_gpa)
    thresholds = pair_thresholds(work.numbers, min_distances, config.min_distance_factor, config.min_distance_floor)
    initial_volume = work.get_volume() if relax_cell else None

    energies: list[float] = []
    snapshot: _Snapshot | None = None
    best_enthalpy, best_step = np.inf, 0
    step = 0
    with ExitStack() as stack:
        write_traj, write_log = _outputs(stack, trajectory, log, work)
        while True:
            snapshot = None
            reason = _geometry_reason(work, thresholds, initial_volume, config)
            if reason is None:
                snapshot, reason = _evaluate(work, relax_cell)
            if reason is None:
                reason = check_values(snapshot.energy, snapshot.forces, snapshot.stress, len(work), config.energy_bounds)
            if reason is not None:
                status = "failed"
                break
            energies.append(snapshot.energy)
            fmax, smax_gpa = _residuals(snapshot, pressure)
            enthalpy = snapshot.energy + (pressure * work.get_volume() if relax_cell else 0.0)
            write_traj()
            write_log(step, snapshot.energy, fmax, smax_gpa)
            if enthalpy < best_enthalpy:
                best_enthalpy, best_step = enthalpy, step
            status, reason = _stop(step, best_step, fmax, smax_gpa, criteria)
            if status is not None:
                break
            try:
                optimizer.step()
            except Exception as exc:  # noqa: BLE001 - any optimizer/calculator failure ends this relaxation
                status, reason = "failed", f"optimizer step failed: {type(exc).__name__}: {exc}"
                break
            step += 1

    result = _result(work, initial, snapshot, status, reason, step, _calls(counted, calls_before), energies, pressure)
    result.hessian = hessian
    return result


def optimizer_target(atoms: Atoms, pressure_gpa: float = 0.0):
    """What the optimizers move: a ``FrechetCellFilter`` (enthalpy at ``pressure_gpa``) over a
    periodic cell, so positions and cell relax together; the atoms themselves otherwise."""
    if atoms.cell.rank == 3 and atoms.pbc.all():
        return FrechetCellFilter(atoms, scalar_pressure=pressure_gpa * units.GPa)
    return atoms


def _start_hessian(optimizer, atoms: Atoms, model: Calculator | None, pressure_gpa: float) -> str:
    """Give BFGS ``model``'s Hessian to start from; which starting Hessian it has."""
    if model is None:
        return "identity"
    if type(optimizer) is not BFGS:
        raise ValueError(f"a model Hessian needs the BFGS optimizer, not {type(optimizer).__name__}")
    from xtalforge.dynamics.hessian import model_hessian

    hessian = model_hessian(atoms, model, pressure_gpa=pressure_gpa)
    if hessian is None:
        return "identity (the model Hessian failed)"
    optimizer.H0 = hessian
    return "model"


def _criteria(config: RelaxConfig, validation: bool) -> _Criteria:
    if validation:
        return _Criteria(config.validation_fmax, config.validation_smax_gpa, config.validation_max_steps, config.patience,
                         config.validation_optimizer)
    return _Criteria(config.fmax, config.smax_gpa, config.max_steps, config.patience, config.optimizer)


def _counted(calculator: Calculator) -> tuple[Calculator, int]:
    """A calculator whose ``calls`` counts evaluations, and the count before we start.

    Oracle calculators count already; anything else is wrapped so one evaluation of
    energy, forces and stress together is one counted call.
    """
    calls = getattr(calculator, "calls", None)
    if isinstance(calls, int):
        return calculator, calls
    return CountingCalculator(calculator), 0


def _calls(counted: Calculator, before: int) -> int:
    return int(counted.calls) - before


def _geometry_reason(atoms: Atoms, thresholds: np.ndarray, initial_volume: float | None, config: RelaxConfig) -> str | None:
    """Checked before the calculator sees the geometry: a collapsed structure is never evaluated."""
    if not np.all(np.isfinite(atoms.positions)):
        return "non-finite positions"
    if initial_volume is not None:
        reason = check_cell(
            atoms.cell[:], len(atoms), initial_volume, config.max_volume_factor, config.max_lattice_length
        )
        if reason is not None:
            return reason
    return check_close_pairs(atoms, thresholds)


def _evaluate(atoms: Atoms, relax_cell: bool) -> tuple[_Snapshot | None, str | None]:
    try:
        energy = float(atoms.get_potential_energy())
        forces = np.array(atoms.get_forces(), dtype=float)
        stress = voigt_6_to_full_3x3_stress(np.asarray(atoms.get_stress(), dtype=float)) if relax_cell else None
    except Exception as exc:  # noqa: BLE001 - a failing calculator fails this structure only
        return None, f"calculator error: {type(exc).__name__}: {exc}".splitlines()[0][:300]
    return _Snapshot(energy, forces, stress), None


def _residuals(snapshot: _Snapshot, pressure: float) -> tuple[float, float | None]:
    """Largest force (eV/Å) and largest stress component relative to the pressure (GPa)."""
    fmax = float(np.linalg.norm(snapshot.forces, axis=1).max()) if len(snapshot.forces) else 0.0
    if snapshot.stress is None:
        return fmax, None
    smax = float(np.abs(snapshot.stress + pressure * np.eye(3)).max()) / units.GPa
    return fmax, smax


def _stop(step: int, best_step: int, fmax: float, smax_gpa: float | None, c: _Criteria) -> tuple[str | None, str | None]:
    if fmax < c.fmax and (smax_gpa is None or smax_gpa < c.smax_gpa):
        return "converged", None
    if step - best_step >= c.patience:
        return "stalled", f"no energy decrease for {c.patience} steps"
    if step >= c.max_steps:
        return "max_steps", f"not converged after {c.max_steps} steps"
    return None, None


def _result(
    work: Atoms,
    initial: Atoms,
    snapshot: _Snapshot | None,
    status: str,
    reason: str | None,
    n_steps: int,
    n_calls: int,
    energies: list[float],
    pressure: float,
) -> RelaxResult:
    final = work.copy()
    final.calc = None
    result = RelaxResult(
        atoms=final, initial=initial, status=status, reason=reason, n_steps=n_steps, n_calls=n_calls, energies=energies
    )
    if snapshot is None:
        return result
    n = max(len(final), 1)
    result.energy = snapshot.energy
    result.energy_per_atom = snapshot.energy / n
    volume = final.get_volume() if snapshot.stress is not None else 0.0
    result.enthalpy_per_atom = (snapshot.energy + pressure * volume) / n
    if np.isfinite(snapshot.energy) and np.all(np.isfinite(snapshot.forces)):
        result.fmax, result.smax_gpa = _residuals(snapshot, pressure)
        stress = None if snapshot.stress is None else full_3x3_to_voigt_6_stress(snapshot.stress)
        final.calc = SinglePointCalculator(
            final, energy=snapshot.energy, free_energy=snapshot.energy, forces=snapshot.forces, stress=stress
        )
    return result


def _outputs(stack: ExitStack, trajectory, log, atoms: Atoms):
    """Writers for the trajectory and the step log (no-ops when not requested)."""
    if trajectory is None:
        write_traj = lambda: None
    else:
        if isinstance(trajectory, (str, Path)):
            trajectory = stack.enter_context(Trajectory(str(trajectory), "w"))
        write_traj = lambda: trajectory.write(atoms)

    if log is None:
        return write_traj, lambda *args: None
    if log == "-":
        stream = sys.stdout
    elif isinstance(log, (str, Path)):
        stream = stack.enter_context(open(log, "a"))
    else:
        stream = log
    stream.write(f"{'step':>5} {'energy/eV':>16} {'fmax/(eV/Å)':>12} {'smax/GPa':>10}\n")

    def write_log(step: int, energy: float, fmax: float, smax_gpa: float | None) -> None:
        smax = "-" if smax_gpa is None else f"{smax_gpa:.4f}"
        stream.write(f"{step:5d} {energy:16.6f} {fmax:12.5f} {smax:>10}\n")

    return write_traj, write_log
