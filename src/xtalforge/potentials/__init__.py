"""Behler–Parrinello neural network potentials (seed 000 II.B; seeds 003 and 004).

>>> ens = train_ensemble(frames)               # frames: ase.Atoms with energy/forces(/stress) labels
>>> pred = ens.predict(Batch.from_atoms(pool))  # one batched pass: energy, forces, stress, spread
>>> ens.save("model.pt"); calc = load("model.pt")  # calc.ensemble is the Ensemble
"""

from xtalforge.potentials.calculator import NNPCalculator
from xtalforge.potentials.checkpoint import FORMAT_VERSION, load, load_model, save_model
from xtalforge.potentials.descriptors import (
    NeighbourGraph,
    SymmetryFunctions,
    build_graph,
)
from xtalforge.potentials.ensemble import Ensemble, relative_force_uncertainty
from xtalforge.potentials.evaluation import evaluate, parity_plot
from xtalforge.potentials.model import BPNN
from xtalforge.potentials.training import train_ensemble, train_model

__all__ = [
    "BPNN",
    "FORMAT_VERSION",
    "Ensemble",
    "NNPCalculator",
    "NeighbourGraph",
    "SymmetryFunctions",
    "build_graph",
    "evaluate",
    "load",
    "load_model",
    "parity_plot",
    "relative_force_uncertainty",
    "save_model",
    "train_ensemble",
    "train_model",
]
