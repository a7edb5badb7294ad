"""ASE calculator on top of an :class:`Ensemble` (or a single :class:`BPNN`)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from xtalforge.structures.batch import Batch


class NNPCalculator(Calculator):
    """Energy, forces, stress and the ensemble spread of one structure at a time.

    Extra results: ``energy_std`` (eV), ``forces_std`` (N, 3), ``stress_std`` (Voigt),
    ``uncertainty`` (seed 004 eq. 5).  :meth:`calculate_many` evaluates many structures in
    batched model calls; ``calc.ensemble.predict`` takes a :class:`Batch` directly.
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
        self.results = self.calculate_many([self.atoms])[0]

    def calculate_many(self, structures: list, chunk: int = 256) -> list[dict]:
        """ASE results dicts (energy, free_energy, forces, stress where periodic, the spreads) of
        many structures, evaluated ``chunk`` structures per batched model call."""
        results = []
        for start in range(0, len(structures), chunk):
            part = structures[start:start + chunk]
            periodic = [bool(np.all(a.pbc)) for a in part]
            pred = self.ensemble.predict(Batch.from_atoms(part), stress=any(periodic))
            bounds = np.cumsum([0] + [len(a) for a in part])
            results += [_results(pred, i, slice(bounds[i], bounds[i + 1]), periodic[i]) for i in range(len(part))]
        return results


def _results(pred, i: int, atoms: slice, periodic: bool) -> dict:
    """Structure ``i``'s results (its atoms are rows ``atoms`` of the batch) as an ASE results dict."""
    energy = float(pred.energy[i])
    results = {"energy": energy, "free_energy": energy, "forces": pred.forces[atoms].cpu().numpy().copy()}
    if pred.energy_std is not None:
        results["energy_std"] = float(pred.energy_std[i])
        results["forces_std"] = pred.forces_std[atoms].cpu().numpy().copy()
    if pred.uncertainty is not None:
        results["uncertainty"] = float(pred.uncertainty[i])
    if periodic:
        results["stress"] = _voigt(pred.stress[i].cpu().numpy())
        if pred.stress_std is not None:
            results["stress_std"] = _voigt(pred.stress_std[i].cpu().numpy())
    return results


def _voigt(tensor: np.ndarray) -> np.ndarray:
    """ASE Voigt order: xx, yy, zz, yz, xz, xy."""
    t = 0.5 * (tensor + tensor.T)
    return np.array([t[0, 0], t[1, 1], t[2, 2], t[1, 2], t[0, 2], t[0, 1]])
