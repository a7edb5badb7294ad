"""A cheap model's Hessian as the starting Hessian of an oracle BFGS relaxation.

BFGS starts from a scaled identity (ASE: 70 eV/Å²) and spends its first oracle steps
learning the curvature. A structure handed to validation was just relaxed by an ML
model that knows the curvature near that minimum well: its Hessian, taken by finite
differences of the model's forces in the optimizer's own coordinates (positions and the
``FrechetCellFilter`` cell coordinates), lets the first oracle step be a Newton step.
Replayed on the 61 SevenNet-0 validations of the 12 cut-down benchmark runs, this cut their
oracle calls from 801 to 224, ending in the same minimum in 60 and a lower one in the other
(benchmarks/validation_hessian.py).
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.calculators.singlepoint import SinglePointCalculator

from xtalforge.dynamics.relax import optimizer_target


def model_hessian(
    atoms: Atoms,
    calculator: Calculator,
    *,
    pressure_gpa: float = 0.0,
    step: float = 2e-3,
    min_curvature: float = 1.0,
    batched: bool = True,
) -> np.ndarray | None:
    """Positive-definite Hessian of ``calculator`` at ``atoms`` (not modified) in BFGS coordinates.

    The coordinates are those ASE's BFGS moves in :func:`~xtalforge.dynamics.relax_structure`:
    :func:`~xtalforge.dynamics.relax.optimizer_target` (the cell filter at ``pressure_gpa`` for periodic cells).
    Central differences of the forces with ``step``; the symmetrised matrix's eigenvalues are
    replaced by their absolute values, floored at ``min_curvature`` (eV/Å²), so BFGS steps
    downhill along modes the model sees as saddles or flat. None when the model fails or
    returns non-finite forces: the caller keeps BFGS's default. With ``batched`` (default), a
    calculator that has ``calculate_many`` (:class:`~xtalforge.potentials.NNPCalculator`) gets all
    2 × (3N + 9) displaced geometries in batched calls instead of one call each.
    """
    work = atoms.copy()
    target = optimizer_target(work, pressure_gpa)
    x0 = target.get_positions().copy()
    n = x0.size
    # Row 2i moves coordinate i by +step, row 2i + 1 by -step.
    displaced = np.repeat(x0.reshape(1, -1), 2 * n, axis=0)
    displaced[np.arange(2 * n), np.repeat(np.arange(n), 2)] += np.tile([step, -step], n)
    try:
        forces = _target_forces(target, work, calculator, displaced.reshape(2 * n, *x0.shape), batched)
    except Exception:  # noqa: BLE001 - a failing model only costs the better starting Hessian
        return None
    hessian = (forces[1::2] - forces[0::2]).T / (2.0 * step)  # H = -dF/dx, column i from rows 2i, 2i+1
    if not np.all(np.isfinite(hessian)):
        return None
    values, vectors = np.linalg.eigh(0.5 * (hessian + hessian.T))
    values = np.maximum(np.abs(values), min_curvature)
    return (vectors * values) @ vectors.T


def _target_forces(target, work: Atoms, calculator: Calculator, positions: np.ndarray, batched: bool) -> np.ndarray:
    """Forces on ``target`` (the filter over ``work``, or ``work``) at each of ``positions``, flattened.

    With ``batched``, a calculator that has ``calculate_many`` (the NNP ensemble) evaluates every
    geometry in batched model calls, and the filter turns each result into forces on its
    coordinates. Otherwise the calculator is called once per geometry.
    """
    if not (batched and hasattr(calculator, "calculate_many")):
        work.calc = calculator
        return np.array([_forces_at(target, x) for x in positions])
    frames = []
    for x in positions:
        target.set_positions(x)
        frames.append(work.copy())
    out = []
    for x, results in zip(positions, calculator.calculate_many(frames), strict=True):
        target.set_positions(x)
        work.calc = SinglePointCalculator(work, **{k: results[k] for k in ("energy", "forces", "stress")
                                                   if k in results})
        out.append(np.asarray(target.get_forces(), dtype=float).ravel())
    return np.array(out)


def _forces_at(target, x: np.ndarray) -> np.ndarray:
    target.set_positions(x)
    return np.asarray(target.get_forces(), dtype=float).ravel()
