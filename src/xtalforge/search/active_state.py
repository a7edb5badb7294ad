"""Checkpoint of an active-learning run: which cycle, which phase, which files.

Everything lives under ``run_dir/active/``::

    state.json                 this checkpoint (written atomically after every phase)
    pool_000.npz               the initial pool (or the pool relaxed by initial models)
    dataset.extxyz             every accepted oracle label so far (training set)
    cycle_001/selection.extxyz the perturbed structures chosen for labelling
    cycle_001/model.pt         the ensemble trained in this cycle
    cycle_001/pool.npz         the pool after relaxation with that ensemble
    cycle_004/validation/*.traj oracle relaxations of a validation after cycle 4 (training data
                               of later cycles when the validation did not confirm the minima)
    ...

and ``run_dir/cycles.json`` holds one summary per finished cycle plus the
validation table, for the report. A cycle advances through the phases
``selected → labelled → trained → relaxed → evaluated``; each phase writes its file
before the checkpoint names it, so a run killed at any point resumes at the first
phase whose output is missing, and oracle labels already in the store are never
requested again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from xtalforge.errors import CheckpointError
from xtalforge.store import read_json, write_json_atomic

STATE_VERSION = 1
ACTIVE_DIR = "active"
CYCLES_NAME = "cycles.json"
PHASES = ("selected", "labelled", "trained", "relaxed", "evaluated")


@dataclass
class CycleSummary:
    """What happened in one cycle (one entry of cycles.json)."""

    cycle: int
    noise: float = 0.0
    n_selected: int = 0
    n_labels_ok: int = 0  # accepted into the training set
    n_labels_rejected: int = 0  # oracle answered, label unphysical
    n_labels_failed: int = 0  # oracle failed
    dataset_size: int = 0
    n_training_frames: int = 0  # after force-outlier exclusion, when the trainer reports it
    oracle_calls_total: int = 0  # run total after this cycle's labels
    training_metrics: dict = field(default_factory=dict)
    relax_status: dict = field(default_factory=dict)  # status -> count over the pool
    lowest_clusters: list = field(default_factory=list)  # [{"energy", "member", "label", "size"}]
    improvement: float | None = None  # largest cluster-energy decrease against earlier pools
    converged: bool = False
    uncertain_fraction: float = 0.0  # of the search pool, stopped relaxing on uncertainty this cycle
    pool_energy_histogram: dict = field(default_factory=dict)  # {"edges": [...], "search": [...], "training": [...]}
    wall_time_s: dict = field(default_factory=dict)  # phase -> seconds


@dataclass
class ActiveState:
    """The checkpoint itself (``active/state.json``)."""

    run_dir: Path
    version: int = STATE_VERSION
    cycle: int = 0  # cycle in progress (0 = before the first)
    phase: str = "evaluated"  # last finished phase of ``cycle``
    initial_pool_done: bool = False
    stopped: bool = False
    stop_reason: str | None = None
    validation_done: bool = False
    cycles: list[dict] = field(default_factory=list)  # CycleSummary dicts of finished cycles
    validation: list[dict] = field(default_factory=list)  # rows of the validated-minima table
    validation_rounds: list[dict] = field(default_factory=list)  # one confirmation check per validation
    pending: dict = field(default_factory=dict)  # summary fields of the cycle in progress

    # -- paths -----------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self.run_dir / ACTIVE_DIR

    @property
    def path(self) -> Path:
        return self.directory / "state.json"

    @property
    def dataset_path(self) -> Path:
        return self.directory / "dataset.extxyz"

    def cycle_dir(self, cycle: int) -> Path:
        return self.directory / f"cycle_{cycle:03d}"

    def pool_path(self, cycle: int) -> Path:
        """Pool after cycle ``cycle``; cycle 0 is the initial pool."""
        return self.directory / "pool_000.npz" if cycle == 0 else self.cycle_dir(cycle) / "pool.npz"

    def model_path(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "model.pt"

    def selection_path(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "selection.extxyz"

    # -- progress ----------------------------------------------------------------

    def done(self, cycle: int, phase: str) -> bool:
        """Whether ``phase`` of ``cycle`` has finished."""
        if cycle < self.cycle:
            return True
        if cycle > self.cycle:
            return False
        return PHASES.index(self.phase) >= PHASES.index(phase)

    def advance(self, cycle: int, phase: str) -> None:
        """Record that ``phase`` of ``cycle`` finished (its files are written) and save."""
        self.cycle, self.phase = cycle, phase
        self.save()

    def finish_cycle(self, summary: CycleSummary) -> None:
        self.cycles = [c for c in self.cycles if c["cycle"] != summary.cycle] + [asdict(summary)]
        self.cycle, self.phase = summary.cycle, "evaluated"
        self.save()

    def stop(self, reason: str) -> None:
        self.stopped, self.stop_reason = True, reason
        self.save()

    def reopen(self) -> None:
        """Go on with further cycles after a validation that did not confirm the minima."""
        self.stopped, self.stop_reason, self.validation_done = False, None, False
        self.save()

    @property
    def last_finished_cycle(self) -> int:
        return self.cycle if self.phase == "evaluated" else self.cycle - 1

    # -- files -------------------------------------------------------------------

    def save(self) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "run_dir"}
        write_json_atomic(self.path, data)
        write_json_atomic(self.run_dir / CYCLES_NAME, {
            "cycles": self.cycles, "stopped": self.stopped, "stop_reason": self.stop_reason,
            "validation": self.validation, "validation_rounds": self.validation_rounds,
        })

    @classmethod
    def load(cls, run_dir: str | Path) -> ActiveState:
        """The checkpoint of ``run_dir``, or a fresh state when there is none."""
        run_dir = Path(run_dir)
        state = cls(run_dir=run_dir)
        if not state.path.exists():
            return state
        data = read_json(state.path)
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise CheckpointError(
                f"{state.path} is from another xtalforge version ({data.get('version') if isinstance(data, dict) else '?'}): "
                "start a new run directory"
            )
        try:
            loaded = cls(run_dir=run_dir, **data)
        except TypeError as exc:
            raise CheckpointError(f"{state.path} is not an active-learning checkpoint ({exc}): start a new run directory") from None
        if loaded.phase not in PHASES:
            raise CheckpointError(f"{state.path} names an unknown phase {loaded.phase!r}: start a new run directory")
        return loaded

    def require(self, path: Path, what: str) -> Path:
        """``path``, which the checkpoint says exists; a clear error when it does not."""
        if not path.exists():
            raise CheckpointError(
                f"{what} {path} is missing although {self.path} says it was written: "
                "restore it or delete the run directory to start over"
            )
        return path


def read_cycles(run_dir: str | Path) -> dict | None:
    """``run_dir/cycles.json`` (per-cycle summaries and validation), or None."""
    path = Path(run_dir) / CYCLES_NAME
    if not path.exists():
        return None
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not an active-learning summary: delete it and resume the run to rewrite it")
    return data
