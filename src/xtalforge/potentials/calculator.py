"""ASE calculator on top of an :class:`Ensemble` (or a single :class:`BPNN`)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from xtalforge.structures.batch import Batch


class NNPCalculator(Calculator):
    """Energy, forces, stress and the ensemble spread of one structure at a time.

    Extra results: ``energy_std`` (eV), ``forces_std`` (N, 3), ``stress_std`` (Voigt),
    ``uncertainty`` (seed 004 eq. 5).  For batches of structures use ``calc.ensemble.predict``.
    """

    implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "forces", "stress", "energy_std", "forces_std",
                              "stress_std", "uncertainty"]

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        # Any model of the batched interface (``predict(batch, stress)`` -> Prediction) works;
        # the spread results are there when the model gives them.
        self.ensemble = model.as_ensemble() if hasattr(model, "as_ensemble") else model

    @property
    def elements(self) -> list[str]:
        return self.ensemble.elements

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        periodic = bool(np.all(self.atoms.pbc))
        pred = self.ensemble.predict(Batch.from_atoms([self.atoms]), stress=periodic)
        energy = float(pred.energy[0])
        self.results = {"energy": energy, "free_energy": energy, "forces": pred.forces.cpu().numpy().copy()}
        if pred.energy_std is not None:
            self.results["energy_std"] = float(pred.energy_std[0])
            self.results["forces_std"] = pred.forces_std.cpu().numpy().copy()
        if pred.uncertainty is not None:
            self.results["uncertainty"] = float(pred.uncertainty[0])
        if periodic:
            self.results["stress"] = _voigt(pred.stress[0].cpu().numpy())
            if pred.stress_std is not None:
                self.results["stress_std"] = _voigt(pred.stress_std[0].cpu().numpy())


def _voigt(tensor: np.ndarray) -> np.ndarray:
    """ASE Voigt order: xx, yy, zz, yz, xz, xy."""
    t = 0.5 * (tensor + tensor.T)
    return np.array([t[0, 0], t[1, 1], t[2, 2], t[1, 2], t[0, 2], t[0, 1]])
