"""Training sets from the composition alone: melt–quench–anneal MD (seed 000 section II.A).

A random cell of about ``n_atoms`` atoms is superheated to lose memory of its start,
cooled stepwise to find an ad hoc melting temperature (the lowest temperature at which
the mean-square displacement still grows linearly), its volume is adjusted until the
mean pressure vanishes, and the liquid is run at that temperature, quenched and
annealed. Frames are kept every ``frame_interval_fs`` with the oracle's energy, forces
and stress and a phase label. Every MD step is one oracle call, kept or not.

The protocol is a small state machine (:class:`ProtocolState`): ``next_segment`` says
what MD to run, ``finish_segment`` takes the decision that follows it. The state and the
MD driver's state are checkpointed together, so a killed run resumes where it stopped.
Who supplies forces and labels is a :class:`Labeller`: the oracle here, an ensemble
with oracle fallback in :mod:`xtalforge.datasets.onthefly`.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
from ase import Atoms
from ase.io import write

from xtalforge.config import MeltQuenchConfig, StructuresConfig
from xtalforge.dynamics.md import (
    Checkpoint,
    MDDriver,
    Segment,
    SegmentProgress,
    SegmentResult,
    driver_state,
    oracle_frame,
    restore_driver_state,
    timestep_from_masses,
)
from xtalforge.errors import CheckpointError, ConfigError
from xtalforge.structures.composition import Composition

PHASES = ("superheat", "melt_search", "volume", "liquid", "quench", "anneal")
_SNAPSHOT_KEYS = ("positions", "momenta", "cell")


class Labeller(Protocol):
    """Supplies the MD forces and decides which frames are kept, with what labels."""

    calculator: object
    frame_interval: int | None  # MD steps between two calls of ``frame``; None = every frame_interval_fs

    def frame(self, atoms: Atoms, segment: Segment, step: int) -> Atoms | None: ...
    def oracle_calls(self) -> int: ...
    def state(self) -> tuple[dict, dict[str, np.ndarray]]: ...
    def restore(self, info: dict, arrays: dict[str, np.ndarray], frames: list[Atoms]) -> None: ...
    def report(self) -> dict: ...


class OracleLabeller:
    """Plain protocol: the oracle drives every step and labels every kept frame."""

    def __init__(self, oracle, keep_phases: list[str]):
        self.oracle = oracle
        self.calculator = oracle.calculator
        self.frame_interval = None
        self.keep_phases = set(keep_phases)
        self._calls_at_start = oracle.calls

    def frame(self, atoms, segment, step):
        return oracle_frame(atoms, segment, step) if segment.phase in self.keep_phases else None

    def oracle_calls(self) -> int:
        return self.oracle.calls - self._calls_at_start

    def state(self):
        return {}, {}

    def restore(self, info, arrays, frames):
        pass

    def report(self) -> dict:
        return {"mode": "plain"}


@dataclass
class ProtocolState:
    """Decisions taken so far; JSON-able so it can be checkpointed."""

    stage: str = "superheat"
    search_index: int = 0
    search: list[dict] = field(default_factory=list)  # {temperature_K, msd_slope, liquid}
    melting_temperature_K: float | None = None
    volume_history: list[dict] = field(default_factory=list)  # {volume_per_atom, pressure_gpa}
    pressure_converged: bool | None = None
    segments: list[dict] = field(default_factory=list)  # SegmentResult.as_dict() of finished segments
    oracle_calls: int = 0  # before this process started
    md_steps: int = 0  # before this process started
    wall_time_s: float = 0.0  # before this process started


@dataclass
class MeltQuenchResult:
    frames: list[Atoms]
    report: dict
    out_dir: Path

    @property
    def dataset_path(self) -> Path:
        return self.out_dir / "dataset.extxyz"


def md_composition(composition: Composition, n_atoms: int) -> Composition:
    """Whole formula units of ``composition`` making about ``n_atoms`` atoms (0: as given)."""
    if n_atoms <= 0:
        return composition
    reduced, _ = composition.reduced
    units_needed = max(1, round(n_atoms / reduced.n_atoms))
    return Composition(tuple((el, n * units_needed) for el, n in reduced.counts))


def initial_structure(composition: Composition, structures: StructuresConfig | None, rng: np.random.Generator,
                      settings: MeltQuenchConfig | None = None) -> Atoms:
    """Random cell obeying the minimum distances of ``structures`` (the structures component's generator).

    Unlike search candidates, the MD cell starts near solid density and nearly
    isotropic (``initial_volume_scale``, ``cell_length_range``): a 2.5 Å lattice vector
    or a half-empty box would make the melting-temperature search measure the cell's
    shape instead of the liquid.
    """
    from xtalforge.structures.constraints import Constraints, atomic_volume
    from xtalforge.structures.generate import generate_structure

    settings = settings or MeltQuenchConfig()
    structures = structures or StructuresConfig()
    mean_volume = float(np.mean([atomic_volume(z) for z in composition.numbers]))
    volume = settings.initial_volume_scale * mean_volume
    edge = (volume * composition.n_atoms) ** (1.0 / 3.0)
    low, high = settings.cell_length_range
    md_structures = replace(structures, mode="random", volume_per_atom=[volume, volume],
                            lattice_min=low * edge, lattice_max=high * edge)
    constraints = Constraints.from_config(composition, md_structures)
    return generate_structure(composition, constraints, rng, mode="random", max_attempts=structures.max_attempts)


def volume_change(history: list[dict], bulk_modulus_gpa: float, max_step: float) -> float:
    """Fractional volume change that should bring the mean pressure to zero.

    Newton step ΔV/V = P/B with B the secant bulk modulus of the last two (V, P) points
    when it is positive (noisy pressures can make it negative) and within a factor 20 of
    the guess, else the guess; clipped to ±``max_step``.
    """
    pressure = history[-1]["pressure_gpa"]
    bulk = bulk_modulus_gpa
    if len(history) >= 2:
        (v1, p1), (v2, p2) = [(h["volume_per_atom"], h["pressure_gpa"]) for h in history[-2:]]
        if abs(v2 - v1) > 1e-9:
            secant = -v2 * (p2 - p1) / (v2 - v1)  # B = -V dP/dV at the current volume
            if secant > 0:
                bulk = float(np.clip(secant, bulk_modulus_gpa / 20, 20 * bulk_modulus_gpa))
    return float(np.clip(pressure / bulk, -max_step, max_step))


class MeltQuenchProtocol:
    """Runs (or resumes) the melt–quench–anneal protocol in ``out_dir``."""

    def __init__(self, atoms: Atoms, settings: MeltQuenchConfig, labeller: Labeller, out_dir: str | Path, *,
                 rng: np.random.Generator, progress: bool = False):
        self.settings = settings
        self.labeller = labeller
        self.out_dir = Path(out_dir)
        self.checkpoint = Checkpoint(self.out_dir / "checkpoint")
        self.timestep_fs = settings.timestep_fs or timestep_from_masses(atoms.numbers)
        self.driver = MDDriver(
            atoms, labeller.calculator, rng=rng, thermostat=settings.thermostat, timestep_fs=self.timestep_fs,
            coupling_fs=settings.coupling_fs, frame_interval=labeller.frame_interval or self.frame_steps(),
            msd_skip_fraction=settings.msd_skip_fraction, msd_min_lag_fs=settings.msd_min_lag_fs,
            checkpoint_every=settings.checkpoint_every, progress=progress,
        )
        if hasattr(labeller, "bind"):
            labeller.bind(self.checkpoint.directory / "models", self.frame_steps())
        self.state = ProtocolState()
        self.snapshot: dict[str, np.ndarray] = {}  # last state known to be liquid
        self.info: dict = {"frame_chunks": []}
        self._started = time.perf_counter()

    # -- the schedule ---------------------------------------------------------

    def steps(self, ps: float) -> int:
        return max(1, round(ps * 1000.0 / self.timestep_fs))

    def frame_steps(self) -> int:
        return max(1, round(self.settings.frame_interval_fs / self.timestep_fs))

    def search_temperatures(self) -> list[float]:
        s = self.settings
        start = s.melt_search_start_K if s.melt_search_start_K is not None else s.superheat_K - s.melt_search_step_K
        if s.melt_search_step_K <= 0:
            raise ConfigError("meltquench.melt_search_step_K must be > 0: give the cooling step in K")
        temps = np.arange(start, s.melt_search_min_K - 1e-9, -s.melt_search_step_K)
        return [float(t) for t in temps]

    def next_segment(self) -> Segment | None:
        s, st = self.settings, self.state
        if st.stage == "superheat":
            return Segment("superheat", self.steps(s.superheat_ps), s.superheat_K)
        if st.stage == "melt_search":
            return Segment("melt_search", self.steps(s.melt_search_ps), self.search_temperatures()[st.search_index])
        if st.stage == "volume":
            return Segment("volume", self.steps(s.volume_ps), st.melting_temperature_K)
        if st.stage == "liquid":
            return Segment("liquid", self.steps(s.liquid_ps), st.melting_temperature_K)
        if st.stage == "quench":
            span = max(st.melting_temperature_K - s.quench_final_K, 0.0)
            if s.quench_rate_K_per_ps <= 0:
                raise ConfigError("meltquench.quench_rate_K_per_ps must be > 0: give the cooling rate in K/ps")
            return Segment("quench", self.steps(span / s.quench_rate_K_per_ps), st.melting_temperature_K,
                           final_temperature_K=s.quench_final_K)
        if st.stage == "anneal":
            return Segment("anneal", self.steps(s.anneal_ps), s.anneal_K)
        return None

    def finish_segment(self, segment: Segment, result: SegmentResult) -> None:
        """The decision after a segment: next temperature, volume change or next phase."""
        s, st = self.settings, self.state
        st.segments.append(result.as_dict())
        liquid = result.msd_slope_A2_per_ps > s.liquid_msd_slope
        if st.stage == "superheat":
            st.melting_temperature_K = segment.temperature_K
            self.snapshot = self._snapshot()
            st.stage = "melt_search" if self.search_temperatures() else "volume"
        elif st.stage == "melt_search":
            st.search.append({"temperature_K": segment.temperature_K, "msd_slope": result.msd_slope_A2_per_ps,
                              "liquid": bool(liquid)})
            if liquid:
                st.melting_temperature_K = segment.temperature_K
                self.snapshot = self._snapshot()
                st.search_index += 1
                if st.search_index >= len(self.search_temperatures()):
                    st.stage = "volume"
            else:
                # Solid (or glassy) at this temperature: go back to the last liquid state.
                self._restore_snapshot()
                st.stage = "volume"
        elif st.stage == "volume":
            self._adjust_volume(result.mean_pressure_gpa)
        else:
            st.stage = {"liquid": "quench", "quench": "anneal", "anneal": "done"}[st.stage]

    def _adjust_volume(self, pressure_gpa: float) -> None:
        s, st = self.settings, self.state
        atoms = self.driver.atoms
        st.volume_history.append({"volume_per_atom": atoms.get_volume() / len(atoms), "pressure_gpa": pressure_gpa})
        if abs(pressure_gpa) <= s.pressure_tol_gpa:
            st.pressure_converged = True
            st.stage = "liquid"
            return
        change = volume_change(st.volume_history, s.bulk_modulus_gpa, s.max_volume_step)
        atoms.set_cell(atoms.cell.array * (1.0 + change) ** (1.0 / 3.0), scale_atoms=True)
        if len(st.volume_history) >= s.volume_max_iterations:
            # Out of iterations: keep the last (best-estimate) correction and go on.
            st.pressure_converged = False
            st.stage = "liquid"

    def _snapshot(self) -> dict[str, np.ndarray]:
        atoms = self.driver.atoms
        return {"positions": atoms.get_positions(), "momenta": atoms.get_momenta(), "cell": atoms.cell.array.copy()}

    def _restore_snapshot(self) -> None:
        atoms = self.driver.atoms
        atoms.set_cell(self.snapshot["cell"], scale_atoms=False)
        atoms.set_positions(self.snapshot["positions"])
        atoms.set_momenta(self.snapshot["momenta"])
        self.driver.thermostat_state = {}

    # -- running and checkpointing -------------------------------------------

    def run(self) -> MeltQuenchResult:
        progress = self._resume()
        while (segment := self.next_segment()) is not None:
            result = self.driver.run(segment, progress, on_frame=self.labeller.frame, on_checkpoint=self._save)
            self.finish_segment(segment, result)
            progress = None
            self._save(None, [])
        return self.finish()

    def _resume(self) -> SegmentProgress | None:
        if not self.checkpoint.exists():
            return None
        info, arrays = self.checkpoint.load()
        if info.get("settings") != asdict(self.settings):
            raise CheckpointError(
                f"{self.checkpoint.directory} was written with other [meltquench] settings: "
                "use a new --out directory or delete the old one"
            )
        mode = self.labeller.report().get("mode")
        if info.get("mode", mode) != mode:
            raise CheckpointError(
                f"{self.checkpoint.directory} holds a {info['mode']} run, not {mode}: "
                "repeat the original command (with or without --on-the-fly) or use a new --out directory"
            )
        self.info = info
        self.state = ProtocolState(**info["protocol"])
        self.snapshot = {k: arrays[f"liquid_{k}"] for k in _SNAPSHOT_KEYS if f"liquid_{k}" in arrays}
        prefix = "labeller_"
        self.labeller.restore(info.get("labeller", {}),
                              {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)},
                              self.checkpoint.frames(info))
        return restore_driver_state(self.driver, info["driver"], arrays)

    def _totals(self) -> ProtocolState:
        """The state with counters that include this process's work."""
        st = self.state
        return ProtocolState(**{
            **asdict(st),
            "oracle_calls": st.oracle_calls + self.labeller.oracle_calls(),
            "wall_time_s": st.wall_time_s + time.perf_counter() - self._started,
            "md_steps": st.md_steps + self.driver.steps_taken,
        })

    def _save(self, progress: SegmentProgress | None, frames: list[Atoms]) -> None:
        """Commit protocol, driver and labeller state with the frames produced since the last commit."""
        driver_info, arrays = driver_state(self.driver, progress)
        labeller_info, labeller_arrays = self.labeller.state()
        arrays.update({f"liquid_{k}": v for k, v in self.snapshot.items()})
        arrays.update({f"labeller_{k}": v for k, v in labeller_arrays.items()})
        info = {
            "settings": asdict(self.settings),
            "mode": self.labeller.report().get("mode"),
            "protocol": asdict(self._totals()),
            "driver": driver_info,
            "labeller": labeller_info,
            "frame_chunks": self.info["frame_chunks"],
        }
        self.info = self.checkpoint.save(info, arrays, frames)

    def finish(self) -> MeltQuenchResult:
        frames = self.checkpoint.frames(self.info)
        report = self.report(frames)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        buffer = io.StringIO()
        write(buffer, frames, format="extxyz")
        _write_text(self.out_dir / "dataset.extxyz", buffer.getvalue())
        _write_text(self.out_dir / "meltquench.json", json.dumps(report, indent=2) + "\n")
        return MeltQuenchResult(frames=frames, report=report, out_dir=self.out_dir)

    def report(self, frames: list[Atoms]) -> dict:
        st = self._totals()
        atoms = self.driver.atoms
        n_frames = {phase: 0 for phase in PHASES}
        for frame in frames:
            n_frames[frame.info.get("phase", "unknown")] = n_frames.get(frame.info.get("phase", "unknown"), 0) + 1
        anneal = next((seg for seg in reversed(st.segments) if seg["phase"] == "anneal"), None)
        return {
            "composition": atoms.get_chemical_formula(mode="metal"),
            "n_atoms": len(atoms),
            "timestep_fs": self.timestep_fs,
            "melting_temperature_K": st.melting_temperature_K,
            "volume_per_atom": atoms.get_volume() / len(atoms),  # after the pressure adjustment (NVT since)
            "pressure_converged": st.pressure_converged,
            "n_frames": {k: v for k, v in n_frames.items() if v},
            "n_frames_total": len(frames),
            "oracle_calls": st.oracle_calls,
            "md_steps": st.md_steps,
            # The plain protocol makes one oracle call per MD step; on-the-fly sampling far fewer.
            "oracle_calls_per_md_step": round(st.oracle_calls / max(st.md_steps, 1), 4),
            "wall_time_s": round(st.wall_time_s, 2),
            "melt_search": st.search,
            "volume_history": st.volume_history,
            "anneal_msd_slope": anneal["msd_slope_A2_per_ps"] if anneal else None,
            "anneal_is_solid": (anneal["msd_slope_A2_per_ps"] <= self.settings.liquid_msd_slope) if anneal else None,
            "warnings": self.warnings(st, anneal),
            "segments": st.segments,
            "labeller": self.labeller.report(),
        }

    def warnings(self, st: ProtocolState, anneal: dict | None) -> list[str]:
        """What in this run deserves a second look, each with the setting that addresses it."""
        s, out = self.settings, []
        superheat = next((seg for seg in st.segments if seg["phase"] == "superheat"), None)
        if superheat and superheat["msd_slope_A2_per_ps"] <= s.liquid_msd_slope:
            out.append("the superheated cell did not diffuse: raise superheat_K or superheat_ps")
        if st.search and all(entry["liquid"] for entry in st.search):
            out.append("still liquid at melt_search_min_K: lower melt_search_min_K to bracket T_m")
        if st.pressure_converged is False:
            out.append(f"mean pressure not within {s.pressure_tol_gpa} GPa after {s.volume_max_iterations} "
                       "volume iterations: raise volume_max_iterations or volume_ps")
        if anneal and anneal["msd_slope_A2_per_ps"] > s.liquid_msd_slope:
            out.append("the annealed cell still diffuses: lower anneal_K or the quench rate")
        return out


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def run_meltquench(
    composition: Composition,
    settings: MeltQuenchConfig,
    oracle,
    out_dir: str | Path,
    *,
    seed: int = 0,
    structures: StructuresConfig | None = None,
    labeller: Labeller | None = None,
    progress: bool = False,
) -> MeltQuenchResult:
    """Run the protocol for about ``settings.n_atoms`` atoms of ``composition``, or resume it in ``out_dir``.

    Writes ``out_dir/dataset.extxyz`` and ``out_dir/meltquench.json``; the oracle's calls
    (every MD step) are counted in the report. ``labeller`` replaces the plain oracle
    labeller (on-the-fly sampling passes its own).
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    checkpoint = Checkpoint(out_dir / "checkpoint")
    if checkpoint.exists():
        # Resume: the structure comes from the checkpoint, not from a new random draw.
        _, arrays = checkpoint.load()
        atoms = Atoms(arrays["numbers"], positions=arrays["positions"], cell=arrays["cell"], pbc=arrays["pbc"])
    else:
        atoms = initial_structure(md_composition(composition, settings.n_atoms), structures, rng, settings)
    labeller = labeller or OracleLabeller(oracle, settings.keep_phases)
    protocol = MeltQuenchProtocol(atoms, settings, labeller, out_dir, rng=rng, progress=progress)
    return protocol.run()
