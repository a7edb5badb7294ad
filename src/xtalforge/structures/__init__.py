"""Compositions, structure generation under constraints, and batches of structures."""

from xtalforge.structures.batch import Batch, Prediction
from xtalforge.structures.composition import Composition

__all__ = ["Batch", "Composition", "Prediction"]
