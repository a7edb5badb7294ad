"""On-the-fly sampling (seed 003 section 3.3.2): the melt–quench protocol driven by an NNP ensemble.

(1) The first ``bootstrap_steps`` MD steps are driven by the oracle; every
``bootstrap_stride``-th of them becomes a training frame and a coarse ensemble is
trained on them. (2) The ensemble then drives the MD. (3) Every frame interval
(20 fs, as in the plain protocol) the current frame is a *candidate*: when the
ensemble's relative force uncertainty U (seed 004 eq. 5) is above
``uncertainty_threshold`` the oracle labels it and it joins the training set; after
``retrain_every`` new frames (and, with ``retrain_growth``, growth of the set by that
fraction) the ensemble is retrained on all of them. A step whose U
exceeds ``max_uncertainty`` (or is not finite) is driven by the oracle instead, so a
lost ensemble cannot wreck the trajectory; that label is kept too. (4) The protocol's
own schedule ends the run.

The dataset holds only oracle-labelled frames. Against the plain protocol (one oracle
call per MD step) the report gives the oracle calls made, the MD steps and the
candidates visited.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.singlepoint import SinglePointCalculator

from xtalforge.config import OnTheFlyConfig
from xtalforge.dynamics.md import Segment


def _labelled_copy(atoms: Atoms, results: dict, uncertainty: float) -> Atoms:
    copy = Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    copy.calc = SinglePointCalculator(copy, energy=results["energy"], free_energy=results["energy"],
                                      forces=np.array(results["forces"]), stress=np.array(results["stress"]))
    copy.info["uncertainty"] = round(float(uncertainty), 5)
    return copy


class OnTheFlyCalculator(Calculator):
    """Ensemble forces, or the oracle's while there is no ensemble yet or the ensemble is lost."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, oracle, settings: OnTheFlyConfig):
        super().__init__()
        self.oracle = oracle
        self.settings = settings
        self.ensemble_calc = None  # None until the bootstrap frames have trained the first ensemble
        self.uncertainty = float("nan")  # U of the latest ensemble evaluation
        self.pending_label: Atoms | None = None  # oracle-labelled copy of the latest oracle-driven step, until taken
        self.nnp_steps = 0
        self.oracle_steps = 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if self.ensemble_calc is not None:
            work = self.atoms.copy()
            work.calc = self.ensemble_calc
            work.get_potential_energy()
            results = self.ensemble_calc.results
            self.uncertainty = float(results["uncertainty"])
            lost = not np.isfinite(self.uncertainty) or not np.all(np.isfinite(results["forces"]))
            if not lost and self.uncertainty <= self.settings.max_uncertainty:
                self.results = {"energy": float(results["energy"]), "free_energy": float(results["energy"]),
                                "forces": results["forces"].copy(), "stress": results["stress"].copy()}
                self.nnp_steps += 1
                return
        self.results = self.oracle_results(self.atoms)
        self.pending_label = _labelled_copy(self.atoms, self.results, self.uncertainty)
        self.oracle_steps += 1

    def oracle_results(self, atoms: Atoms) -> dict:
        work = atoms.copy()
        work.calc = self.oracle.calculator
        work.get_potential_energy()
        res = self.oracle.calculator.results
        return {"energy": float(res["energy"]), "free_energy": float(res["energy"]),
                "forces": res["forces"].copy(), "stress": res["stress"].copy()}


class OnTheFlyLabeller:
    """Labeller for :class:`~xtalforge.datasets.meltquench.MeltQuenchProtocol` in on-the-fly mode."""

    frame_interval = 1  # called every step: bootstrap frames and candidates come at different strides

    def __init__(self, oracle, settings: OnTheFlyConfig | None = None, *, potential=None, seed: int = 0,
                 progress: bool = False):
        self.oracle = oracle
        self.settings = settings or OnTheFlyConfig()
        self.potential = potential  # PotentialConfig for train_ensemble; None = its defaults
        self.seed = seed
        self.progress = progress
        self.calculator = OnTheFlyCalculator(oracle, self.settings)
        self.candidate_interval = 10  # MD steps between candidates; set by the protocol (20 fs)
        self.model_dir: Path | None = None
        self.model_file: str | None = None
        self.training: list[Atoms] = []  # every oracle-labelled frame so far
        self.counters = {"candidates": 0, "labelled_candidates": 0, "lost_steps": 0, "bootstrap_frames": 0,
                         "new_since_training": 0, "ensembles_trained": 0, "nnp_steps": 0, "oracle_steps": 0}
        self.uncertainties: list[float] = []  # U of every candidate
        self._calls_at_start = oracle.calls

    def bind(self, directory: Path, frame_steps: int) -> None:
        """Where ensembles are saved (next to the protocol's checkpoint) and the candidate stride."""
        self.model_dir = Path(directory)
        self.candidate_interval = frame_steps

    # -- the frame hook ------------------------------------------------------

    def frame(self, atoms: Atoms, segment: Segment, step: int) -> Atoms | None:
        calc = self.calculator
        label, calc.pending_label = calc.pending_label, None
        if calc.ensemble_calc is None:
            return self._bootstrap(label, segment, step)
        if label is not None:
            # The ensemble was lost at this step and the oracle drove it: keep that label.
            self.counters["lost_steps"] += 1
            return self._add(label, segment, step)
        if step % self.candidate_interval:
            return None
        self.counters["candidates"] += 1
        self.uncertainties.append(calc.uncertainty)
        if calc.uncertainty <= self.settings.uncertainty_threshold:
            return None
        self.counters["labelled_candidates"] += 1
        return self._add(_labelled_copy(atoms, calc.oracle_results(atoms), calc.uncertainty), segment, step)

    def _bootstrap(self, label: Atoms | None, segment: Segment, step: int) -> Atoms | None:
        if label is None or step % max(1, self.settings.bootstrap_stride):
            return None
        self.counters["bootstrap_frames"] += 1
        frame = self._add(label, segment, step, retrain=False)
        if self._totals()["oracle_steps"] >= self.settings.bootstrap_steps:
            self.retrain()
        return frame

    def _add(self, frame: Atoms, segment: Segment, step: int, retrain: bool = True) -> Atoms:
        frame.info["phase"] = segment.phase
        frame.info["temperature_K"] = round(segment.temperature_at(step), 3)
        self.training.append(frame)
        self.counters["new_since_training"] += 1
        if retrain and self.retrain_due():
            self.retrain()
        return frame

    def retrain_due(self) -> bool:
        """``retrain_every`` new frames, and growth by ``retrain_growth`` of the set trained last."""
        new = self.counters["new_since_training"]
        trained_on = len(self.training) - new
        return new >= max(self.settings.retrain_every, self.settings.retrain_growth * trained_on)

    def retrain(self) -> None:
        from xtalforge.potentials import train_ensemble

        self.counters["ensembles_trained"] += 1
        generation = self.counters["ensembles_trained"]
        ensemble = train_ensemble(self.training, config=self.potential, n_models=self.settings.n_models,
                                  seed=self.seed * 1000 + generation, progress=self.progress)
        self.calculator.ensemble_calc = ensemble.calculator()
        self.counters["new_since_training"] = 0
        if self.model_dir is not None:
            self.model_dir.mkdir(parents=True, exist_ok=True)
            self.model_file = f"ensemble_{generation:04d}.pt"
            ensemble.save(self.model_dir / self.model_file)

    # -- Labeller protocol -----------------------------------------------------

    def oracle_calls(self) -> int:
        """Oracle calls made by this process (the protocol adds those of earlier ones)."""
        return self.oracle.calls - self._calls_at_start

    def _totals(self) -> dict:
        calc = self.calculator
        return {**self.counters, "nnp_steps": self.counters["nnp_steps"] + calc.nnp_steps,
                "oracle_steps": self.counters["oracle_steps"] + calc.oracle_steps}

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {"counters": self._totals(), "model_file": self.model_file}, {
            "uncertainties": np.asarray(self.uncertainties, dtype=float)
        }

    def restore(self, info: dict, arrays: dict[str, np.ndarray], frames: list[Atoms]) -> None:
        from xtalforge.potentials.checkpoint import load_model

        self.training = list(frames)
        self.counters.update(info.get("counters", {}))
        self.uncertainties = [float(u) for u in arrays.get("uncertainties", [])]
        self.model_file = info.get("model_file")
        if self.model_file and self.model_dir is not None:
            self.calculator.ensemble_calc = load_model(self.model_dir / self.model_file).calculator()

    def report(self) -> dict:
        u = np.asarray(self.uncertainties, dtype=float)
        counters = self._totals()
        return {
            "mode": "on-the-fly",
            "settings": {k: getattr(self.settings, k) for k in self.settings.__dataclass_fields__},
            **{k: v for k, v in counters.items() if k != "new_since_training"},
            "training_frames": len(self.training),
            "candidate_uncertainty_median": float(np.median(u)) if u.size else None,
            "candidate_uncertainty_p90": float(np.quantile(u, 0.9)) if u.size else None,
            "final_model": self.model_file,
        }
