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
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.filters import FrechetCellFilter


def model_hessian(
    atoms: Atoms,
    calculator: Calculator,
    *,
    pressure_gpa: float = 0.0,
    step: float = 2e-3,
    min_curvature: float = 1.0,
) -> np.ndarray | None:
    """Positive-definite Hessian of ``calculator`` at ``atoms`` (not modified) in BFGS coordinates.

    The coordinates are those ASE's BFGS moves in :func:`~xtalforge.dynamics.relax_structure`:
    a ``FrechetCellFilter`` (enthalpy at ``pressure_gpa``) for periodic cells, positions otherwise.
    Central differences of the forces with ``step``; the symmetrised matrix's eigenvalues are
    replaced by their absolute values, floored at ``min_curvature`` (eV/Å²), so BFGS steps
    downhill along modes the model sees as saddles or flat. None when the model fails or
    returns non-finite forces: the caller keeps BFGS's default.
    """
    work = atoms.copy()
    work.calc = calculator
    periodic = bool(work.cell.rank == 3 and work.pbc.all())
    target = FrechetCellFilter(work, scalar_pressure=pressure_gpa * units.GPa) if periodic else work
    x0 = target.get_positions().copy()
    shape, n = x0.shape, x0.size
    hessian = np.empty((n, n))
    try:
        for i in range(n):
            forces = []
            for sign in (1.0, -1.0):
                x = x0.ravel().copy()
                x[i] += sign * step
                target.set_positions(x.reshape(shape))
                forces.append(np.asarray(target.get_forces(), dtype=float).ravel())
            hessian[:, i] = (forces[1] - forces[0]) / (2.0 * step)  # H = -dF/dx
    except Exception:  # noqa: BLE001 - a failing model only costs the better starting Hessian
        return None
    if not np.all(np.isfinite(hessian)):
        return None
    values, vectors = np.linalg.eigh(0.5 * (hessian + hessian.T))
    values = np.maximum(np.abs(values), min_curvature)
    return (vectors * values) @ vectors.T
