"""Relaxation (and molecular dynamics) of structures.

``relax_structure`` relaxes one structure with an ASE calculator (the oracle: ASE FIRE or
L-BFGS on a FrechetCellFilter); ``batched_relax`` relaxes a whole pool with a batched
potential (one ``model.predict`` per step for all structures still moving).
"""

from xtalforge.dynamics.batched import BATCH_STATUSES, BatchRelaxResult, FireParameters, batched_relax
from xtalforge.dynamics.relax import STATUSES, RelaxResult, relax_structure

__all__ = [
    "BATCH_STATUSES", "STATUSES", "BatchRelaxResult", "FireParameters", "RelaxResult", "batched_relax",
    "relax_structure",
]
