"""Relaxation (and molecular dynamics) of structures.

``relax_structure`` relaxes one structure with an ASE calculator (the oracle: ASE FIRE or
L-BFGS or BFGS on a FrechetCellFilter, BFGS optionally starting from a cheap model's Hessian,
``model_hessian``); ``batched_relax`` relaxes a whole pool with a batched
potential (one ``model.predict`` per step for all structures still moving).
"""

from xtalforge.dynamics.batched import BATCH_STATUSES, BatchRelaxResult, FireParameters, batched_relax
from xtalforge.dynamics.hessian import model_hessian
from xtalforge.dynamics.relax import STATUSES, RelaxResult, relax_structure

__all__ = [
    "BATCH_STATUSES", "STATUSES", "BatchRelaxResult", "FireParameters", "RelaxResult", "batched_relax",
    "model_hessian", "relax_structure",
]
