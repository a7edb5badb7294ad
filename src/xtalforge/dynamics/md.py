"""Thermostatted molecular dynamics for training-set generation.

One :class:`MDDriver` runs :class:`Segment` s (a phase label, a number of steps, a
constant or linearly ramped target temperature) through ASE's integrators with a
proper thermostat (Langevin, Bussi stochastic velocity rescaling or a Nosé–Hoover
chain). While it runs it tracks the mean-square displacement (liquid or solid?) and
the total pressure (volume adjustment), hands every ``frame_interval``-th step to a
frame hook (which decides what is kept), and calls a checkpoint hook every
``checkpoint_every`` steps. Everything needed to continue a segment exactly where it
stopped (atoms, random state, thermostat variables, trackers) round-trips through
:func:`driver_state` / :func:`restore_driver_state` and the atomic :class:`Checkpoint`
directory, so a killed run resumes on the same trajectory.

Every force evaluation of the attached calculator is one step: with a counting oracle
calculator every MD step is one counted oracle call, whether or not its frame is kept.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
from ase import Atoms, units
from ase.data import atomic_masses
from ase.io import read, write
from ase.md.bussi import Bussi
from ase.md.langevin import Langevin
from ase.md.md import MolecularDynamics
from ase.md.nose_hoover_chain import NoseHooverChainNVT
from tqdm.auto import tqdm

from xtalforge.errors import CheckpointError, ConfigError, XtalforgeError

THERMOSTATS = ("langevin", "bussi", "nose_hoover")
GPA_PER_EV_A3 = 160.21766208


def timestep_from_masses(
    numbers, fs_per_sqrt_amu: float = 0.38, min_fs: float = 0.25, max_fs: float = 2.0
) -> float:
    """MD time step in fs chosen from the lightest element.

    Vibrational periods scale as sqrt(mass), so the step does too: 0.38 fs·amu^-1/2
    gives 2.0 fs for Si, 1.5 fs for O, 1.0 fs for Li and 0.4 fs for H, clipped to
    [min_fs, max_fs].
    """
    lightest = float(np.min(atomic_masses[np.asarray(numbers, dtype=int)]))
    return float(np.clip(fs_per_sqrt_amu * math.sqrt(lightest), min_fs, max_fs))


def maxwell_boltzmann(atoms: Atoms, temperature_K: float, rng: np.random.Generator) -> None:
    """Random Maxwell–Boltzmann momenta at exactly ``temperature_K``, no centre-of-mass drift."""
    masses = atoms.get_masses()[:, None]
    momenta = rng.standard_normal((len(atoms), 3)) * np.sqrt(masses * units.kB * temperature_K)
    momenta -= masses * (momenta.sum(axis=0) / masses.sum())
    atoms.set_momenta(momenta)
    current = atoms.get_temperature()
    if current > 0:
        atoms.set_momenta(momenta * math.sqrt(temperature_K / current))


def build_dynamics(
    atoms: Atoms,
    thermostat: str,
    timestep_fs: float,
    temperature_K: float,
    coupling_fs: float,
    rng: np.random.Generator,
) -> MolecularDynamics:
    """An ASE NVT integrator; ``coupling_fs`` is the thermostat time constant."""
    dt = timestep_fs * units.fs
    if thermostat == "langevin":
        return Langevin(atoms, dt, temperature_K=temperature_K, friction=1.0 / (coupling_fs * units.fs),
                        fixcm=False, rng=rng)
    if thermostat == "bussi":
        if atoms.get_kinetic_energy() <= 1e-12:
            maxwell_boltzmann(atoms, temperature_K, rng)
        return Bussi(atoms, dt, temperature_K=temperature_K, taut=coupling_fs * units.fs, rng=rng)
    if thermostat == "nose_hoover":
        return NoseHooverChainNVT(atoms, dt, temperature_K=temperature_K, tdamp=coupling_fs * units.fs)
    raise ConfigError(f"unknown thermostat {thermostat!r}: choose one of {', '.join(THERMOSTATS)}")


def set_target_temperature(dyn: MolecularDynamics, temperature_K: float) -> None:
    """Change the thermostat's target temperature in place (used for ramps)."""
    if isinstance(dyn, Langevin):
        dyn.set_temperature(temperature_K=temperature_K)
    elif isinstance(dyn, Bussi):
        dyn.temp = temperature_K * units.kB
        dyn.target_kinetic_energy = 0.5 * dyn.temp * dyn.ndof
    elif isinstance(dyn, NoseHooverChainNVT):
        thermostat = dyn._thermostat
        kT = units.kB * temperature_K
        # Chain masses scale with kT (Martyna–Tuckerman choice, as in ASE's constructor).
        thermostat._Q *= kT / thermostat._kT
        thermostat._kT = kT
    else:
        raise TypeError(f"cannot set the temperature of {type(dyn).__name__}")


def thermostat_arrays(dyn: MolecularDynamics) -> dict[str, np.ndarray]:
    """Internal thermostat variables needed to continue exactly (Nosé–Hoover only)."""
    if isinstance(dyn, NoseHooverChainNVT):
        return {"nhc_eta": dyn._thermostat._eta.copy(), "nhc_p_eta": dyn._thermostat._p_eta.copy()}
    return {}


def restore_thermostat_arrays(dyn: MolecularDynamics, arrays: dict[str, np.ndarray]) -> None:
    if isinstance(dyn, NoseHooverChainNVT) and "nhc_eta" in arrays:
        dyn._thermostat._eta[:] = arrays["nhc_eta"]
        dyn._thermostat._p_eta[:] = arrays["nhc_p_eta"]


def total_pressure_gpa(atoms: Atoms) -> float:
    """Instantaneous pressure including the kinetic (ideal-gas) term, GPa."""
    stress = atoms.get_stress(voigt=True, include_ideal_gas=True)
    return float(-stress[:3].mean() * GPA_PER_EV_A3)


class MSDTracker:
    """Mean-square displacement of the atoms during one segment.

    Displacements are accumulated step by step through the minimum image, so wrapped
    positions and uniform cell rescaling do not create jumps; the centre-of-mass drift
    (a Langevin thermostat lets it wander) is removed. Sampled displacements are kept
    (thinned to at most ``max_samples``) so that :meth:`slope` can average over many
    time origins: with a few dozen atoms a single-origin MSD is too noisy to tell a
    liquid from a solid in a picosecond.
    """

    def __init__(self, atoms: Atoms, max_samples: int = 400):
        self.masses = atoms.get_masses()
        self.last = atoms.get_positions().copy()
        self.displacement = np.zeros_like(self.last)
        self.max_samples = max_samples
        self.stride = 1  # keep every stride-th sample in the history
        self.n_sampled = 0
        self.times_fs: list[float] = []
        self.history: list[np.ndarray] = []  # COM-free displacements at times_fs

    def update(self, atoms: Atoms) -> None:
        step = atoms.get_positions() - self.last
        frac = np.linalg.solve(atoms.cell.array.T, step.T).T
        frac -= np.round(frac)
        self.displacement += frac @ atoms.cell.array
        self.last = atoms.get_positions().copy()

    def _com_free(self) -> np.ndarray:
        com = (self.masses[:, None] * self.displacement).sum(axis=0) / self.masses.sum()
        return self.displacement - com

    def msd(self) -> float:
        """MSD from the start of the segment, Å²."""
        return float(np.mean(np.sum(self._com_free() ** 2, axis=1)))

    def sample(self, time_fs: float) -> None:
        if self.n_sampled % self.stride == 0:
            self.times_fs.append(float(time_fs))
            self.history.append(self._com_free())
            if len(self.history) > self.max_samples:
                self.times_fs, self.history = self.times_fs[::2], self.history[::2]
                self.stride *= 2
        self.n_sampled += 1

    def slope(self, skip_fraction: float = 0.25, min_lag_fs: float = 100.0) -> float:
        """d(MSD)/dτ in Å²/ps, averaged over time origins, after the first ``skip_fraction`` of the segment.

        MSD(τ) is the mean over all origins of the displacement over a lag τ. The slope
        is fitted for lags from ``min_lag_fs`` (past the ballistic rise to the vibrational
        plateau, which would make a solid look diffusive) to half the analysed window
        (so every lag still has many origins). A solid gives ~0, a liquid 6D.
        """
        if len(self.history) < 4:
            return 0.0
        times = np.asarray(self.times_fs)
        start = int(np.searchsorted(times, times[0] + skip_fraction * (times[-1] - times[0])))
        positions = np.asarray(self.history[start:])
        n = len(positions)
        if n < 4:
            return 0.0
        dt_fs = float(np.mean(np.diff(times[start:])))
        low = max(1, int(round(min_lag_fs / dt_fs)))
        high = max(low + 2, n // 2)
        if high > n - 2:  # window too short for min_lag_fs: use the longest lags there are
            low, high = max(1, n // 2), n - 1
        lags = np.unique(np.round(np.linspace(low, high, 8)).astype(int))
        msd = [np.mean(np.sum((positions[lag:] - positions[:-lag]) ** 2, axis=2)) for lag in lags]
        return float(np.polyfit(lags * dt_fs / 1000.0, msd, 1)[0])

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        info = {"times_fs": self.times_fs, "stride": self.stride, "n_sampled": self.n_sampled}
        history = np.asarray(self.history) if self.history else np.zeros((0,) + self.last.shape)
        return info, {"msd_last": self.last, "msd_displacement": self.displacement, "msd_history": history}

    @classmethod
    def from_state(cls, atoms: Atoms, info: dict, arrays: dict[str, np.ndarray]) -> "MSDTracker":
        tracker = cls(atoms)
        tracker.last = np.array(arrays["msd_last"], dtype=float)
        tracker.displacement = np.array(arrays["msd_displacement"], dtype=float)
        tracker.times_fs = list(info["times_fs"])
        tracker.stride = int(info["stride"])
        tracker.n_sampled = int(info["n_sampled"])
        tracker.history = list(np.array(arrays["msd_history"], dtype=float))
        return tracker


@dataclass
class Segment:
    """A stretch of NVT MD with one phase label and a constant or linearly ramped temperature."""

    phase: str
    n_steps: int
    temperature_K: float
    final_temperature_K: float | None = None  # None: constant temperature
    record: bool = True  # hand frames to the frame hook

    def temperature_at(self, step: int) -> float:
        if self.final_temperature_K is None or self.n_steps <= 0:
            return self.temperature_K
        return self.temperature_K + (self.final_temperature_K - self.temperature_K) * step / self.n_steps


@dataclass
class SegmentProgress:
    """What a segment has done so far; enough to continue it after a restart."""

    step: int = 0
    n_frames: int = 0
    pressures_gpa: list[float] = field(default_factory=list)
    temperatures_K: list[float] = field(default_factory=list)
    msd: MSDTracker | None = None


@dataclass
class SegmentResult:
    phase: str
    n_steps: int
    target_temperature_K: float
    mean_temperature_K: float
    mean_pressure_gpa: float  # over the second half of the segment
    msd_slope_A2_per_ps: float  # multi-origin, after msd_skip_fraction of the segment
    msd_final_A2: float
    n_frames: int
    frames: list[Atoms] = field(default_factory=list, repr=False)  # only when no checkpoint hook took them

    def as_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "frames"}
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in values.items()}


FrameHook = Callable[[Atoms, Segment, int], "Atoms | None"]


def oracle_frame(atoms: Atoms, segment: Segment, step: int) -> Atoms:
    """Copy of ``atoms`` with the labels the calculator just computed (energy, forces, stress)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    results = atoms.calc.results
    frame = Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    frame.calc = SinglePointCalculator(
        frame, energy=results["energy"], free_energy=results["energy"],
        forces=np.array(results["forces"]), stress=np.array(results["stress"]),
    )
    frame.info["phase"] = segment.phase
    frame.info["temperature_K"] = round(segment.temperature_at(step), 3)
    return frame


class MDDriver:
    """Runs segments of NVT MD on one ``atoms`` with one calculator and one random stream."""

    def __init__(
        self,
        atoms: Atoms,
        calculator,
        *,
        rng: np.random.Generator,
        thermostat: str = "langevin",
        timestep_fs: float | None = None,
        coupling_fs: float = 100.0,
        frame_interval: int = 10,
        msd_interval: int = 5,
        msd_skip_fraction: float = 0.25,
        msd_min_lag_fs: float = 100.0,
        checkpoint_every: int = 500,
        progress: bool = False,
    ):
        if thermostat not in THERMOSTATS:
            raise ConfigError(f"unknown thermostat {thermostat!r}: choose one of {', '.join(THERMOSTATS)}")
        self.atoms = atoms
        self.atoms.calc = calculator
        self.rng = rng
        self.thermostat = thermostat
        self.timestep_fs = timestep_fs or timestep_from_masses(atoms.numbers)
        self.coupling_fs = coupling_fs
        self.frame_interval = max(1, frame_interval)
        self.msd_interval = max(1, msd_interval)
        self.msd_skip_fraction = msd_skip_fraction
        self.msd_min_lag_fs = msd_min_lag_fs
        self.checkpoint_every = max(1, checkpoint_every)
        self.progress = progress
        self.thermostat_state: dict[str, np.ndarray] = {}
        self.steps_taken = 0  # MD steps run by this driver (this process)

    def run(
        self,
        segment: Segment,
        progress: SegmentProgress | None = None,
        *,
        on_frame: FrameHook = oracle_frame,
        on_checkpoint: Callable[[SegmentProgress, list[Atoms]], None] | None = None,
    ) -> SegmentResult:
        """Run (or continue) ``segment``; frames go to ``on_checkpoint`` with the state that includes them."""
        progress = progress or SegmentProgress()
        if progress.msd is None:
            progress.msd = MSDTracker(self.atoms)
        if progress.step == 0 and self.atoms.get_kinetic_energy() <= 1e-12:
            maxwell_boltzmann(self.atoms, segment.temperature_at(0), self.rng)
        dyn = build_dynamics(self.atoms, self.thermostat, self.timestep_fs, segment.temperature_at(progress.step),
                             self.coupling_fs, self.rng)
        restore_thermostat_arrays(dyn, self.thermostat_state)
        pending: list[Atoms] = []
        bar = tqdm(total=segment.n_steps, initial=progress.step, desc=segment.phase, leave=False,
                   disable=not self.progress)
        while progress.step < segment.n_steps:
            if segment.final_temperature_K is not None:
                set_target_temperature(dyn, segment.temperature_at(progress.step))
            dyn.step()
            progress.step += 1
            self.steps_taken += 1
            self._check_finite(segment, progress.step)
            self._observe(segment, progress)
            if segment.record and progress.step % self.frame_interval == 0:
                frame = on_frame(self.atoms, segment, progress.step)
                if frame is not None:
                    pending.append(frame)
                    progress.n_frames += 1
            if on_checkpoint and (progress.step % self.checkpoint_every == 0 or progress.step == segment.n_steps):
                self.thermostat_state = thermostat_arrays(dyn)
                on_checkpoint(progress, pending)
                pending = []
            bar.update(1)
        bar.close()
        self.thermostat_state = thermostat_arrays(dyn)
        result = self.result(segment, progress)
        result.frames = pending  # empty when a checkpoint hook has taken them
        return result

    def _observe(self, segment: Segment, progress: SegmentProgress) -> None:
        progress.msd.update(self.atoms)
        if progress.step % self.msd_interval == 0:
            progress.msd.sample(progress.step * self.timestep_fs)
            progress.temperatures_K.append(float(self.atoms.get_temperature()))
            progress.pressures_gpa.append(total_pressure_gpa(self.atoms))

    def _check_finite(self, segment: Segment, step: int) -> None:
        if not np.all(np.isfinite(self.atoms.positions)) or not np.all(np.isfinite(self.atoms.get_momenta())):
            raise XtalforgeError(
                f"MD blew up in phase {segment.phase!r} at step {step} (non-finite positions): "
                "lower the time step (timestep_fs) or the temperature"
            )

    def result(self, segment: Segment, progress: SegmentProgress) -> SegmentResult:
        half = len(progress.pressures_gpa) // 2
        return SegmentResult(
            phase=segment.phase,
            n_steps=segment.n_steps,
            target_temperature_K=segment.temperature_at(segment.n_steps),
            mean_temperature_K=float(np.mean(progress.temperatures_K[half:])) if progress.temperatures_K else 0.0,
            mean_pressure_gpa=float(np.mean(progress.pressures_gpa[half:])) if progress.pressures_gpa else 0.0,
            msd_slope_A2_per_ps=progress.msd.slope(self.msd_skip_fraction, self.msd_min_lag_fs),
            msd_final_A2=progress.msd.msd(),
            n_frames=progress.n_frames,
        )


# ---------------------------------------------------------------------------
# Saving and restoring the state of a driver and of its current segment


def driver_state(driver: MDDriver, progress: SegmentProgress | None) -> tuple[dict, dict[str, np.ndarray]]:
    """JSON-able info and arrays that let ``restore_driver_state`` continue exactly here."""
    atoms = driver.atoms
    info = {"rng": driver.rng.bit_generator.state, "timestep_fs": driver.timestep_fs}
    arrays = {
        "positions": atoms.get_positions(), "momenta": atoms.get_momenta(), "cell": atoms.cell.array.copy(),
        "numbers": atoms.numbers.copy(), "pbc": atoms.pbc.copy(), **driver.thermostat_state,
    }
    if progress is not None:
        msd_info, msd_arrays = progress.msd.state() if progress.msd else ({}, {})
        info["segment"] = {"step": progress.step, "n_frames": progress.n_frames,
                           "pressures_gpa": progress.pressures_gpa, "temperatures_K": progress.temperatures_K,
                           "msd": msd_info}
        arrays.update(msd_arrays)
    return info, arrays


def restore_driver_state(driver: MDDriver, info: dict, arrays: dict[str, np.ndarray]) -> SegmentProgress | None:
    """Put ``driver`` back where ``driver_state`` left it; returns the segment progress saved with it."""
    atoms = driver.atoms
    if len(arrays["numbers"]) != len(atoms) or not np.array_equal(arrays["numbers"], atoms.numbers):
        raise CheckpointError("checkpoint holds a different structure: delete the run directory or use another --out")
    atoms.set_cell(arrays["cell"], scale_atoms=False)
    atoms.set_positions(arrays["positions"])
    atoms.set_momenta(arrays["momenta"])
    driver.rng.bit_generator.state = info["rng"]
    driver.timestep_fs = info["timestep_fs"]
    driver.thermostat_state = {k: arrays[k] for k in ("nhc_eta", "nhc_p_eta") if k in arrays}
    seg = info.get("segment")
    if seg is None:
        return None
    progress = SegmentProgress(step=seg["step"], n_frames=seg["n_frames"], pressures_gpa=list(seg["pressures_gpa"]),
                               temperatures_K=list(seg["temperatures_K"]))
    progress.msd = MSDTracker.from_state(atoms, seg["msd"], arrays) if seg["msd"] else None
    return progress


class Checkpoint:
    """A run directory that is always in a consistent state.

    ``state.npz`` (arrays plus the JSON info) is the commit point and is replaced
    atomically; frames are written first as numbered chunk files, and only the chunks
    listed in the committed state count, so a kill at any moment leaves either the old
    or the new state, never a mix.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.frames_dir = self.directory / "frames"
        self.path = self.directory / "state.npz"

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, info: dict, arrays: dict[str, np.ndarray], new_frames: list[Atoms] = ()) -> dict:
        """Commit ``info`` and ``arrays`` with ``new_frames``; returns ``info`` with the updated chunk list."""
        self.frames_dir.mkdir(parents=True, exist_ok=True)
        chunks = list(info.get("frame_chunks", []))
        if new_frames:
            name = f"chunk_{len(chunks):06d}.extxyz"
            buffer = io.StringIO()
            write(buffer, list(new_frames), format="extxyz")
            _atomic_write(self.frames_dir / name, buffer.getvalue().encode())
            chunks.append(name)
        info = {**info, "frame_chunks": chunks}
        buffer = io.BytesIO()
        np.savez(buffer, __info__=np.frombuffer(json.dumps(info).encode(), dtype=np.uint8), **arrays)
        _atomic_write(self.path, buffer.getvalue())
        return info

    def load(self) -> tuple[dict, dict[str, np.ndarray]]:
        try:
            with np.load(self.path) as data:
                arrays = {k: data[k] for k in data.files if k != "__info__"}
                info = json.loads(data["__info__"].tobytes().decode())
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {self.path} is unreadable ({exc}): delete it to start over") from None
        return info, arrays

    def frames(self, info: dict) -> list[Atoms]:
        frames: list[Atoms] = []
        for name in info.get("frame_chunks", []):
            path = self.frames_dir / name
            if not path.is_file():
                raise CheckpointError(f"frame chunk {path} is missing: delete {self.directory} to start over")
            frames.extend(read(path, index=":", format="extxyz"))
        return frames


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
