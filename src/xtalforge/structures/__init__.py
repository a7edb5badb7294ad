"""Compositions, structure generation under constraints, and batches of structures."""

from xtalforge.structures.batch import Batch, Prediction
from xtalforge.structures.composition import Composition
from xtalforge.structures.constraints import Constraints, atomic_volume
from xtalforge.structures.generate import (
    PyxtalTimeout,
    candidate_rng,
    compatible_spacegroups,
    generate_many,
    generate_structure,
)

__all__ = [
    "Batch",
    "Composition",
    "Constraints",
    "Prediction",
    "PyxtalTimeout",
    "atomic_volume",
    "candidate_rng",
    "compatible_spacegroups",
    "generate_many",
    "generate_structure",
]
