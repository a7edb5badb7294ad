"""Thermostatted MD driver: time step, thermostats, MSD, pressure, counted steps, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT

from xtalforge.config import OracleConfig
from xtalforge.dynamics.md import (
    THERMOSTATS,
    Checkpoint,
    MDDriver,
    MSDTracker,
    Segment,
    driver_state,
    maxwell_boltzmann,
    restore_driver_state,
    timestep_from_masses,
    total_pressure_gpa,
)
from xtalforge.errors import CheckpointError
from xtalforge.oracles import build_oracle


def copper(seed: int = 0) -> Atoms:
    atoms = bulk("Cu", "fcc", 3.6, cubic=True) * (2, 2, 2)
    atoms.rattle(0.05, rng=np.random.default_rng(seed))
    return atoms


class NoForces(Calculator):
    """Non-interacting particles: an ideal gas."""

    implemented_properties = ["energy", "forces", "stress"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results = {"energy": 0.0, "forces": np.zeros((len(self.atoms), 3)), "stress": np.zeros(6)}


def test_timestep_scales_with_sqrt_of_lightest_mass():
    assert timestep_from_masses([14]) == 2.0  # 0.38·sqrt(28.09) = 2.01, clipped to max_fs
    assert timestep_from_masses([14], max_fs=5) == pytest.approx(0.38 * np.sqrt(28.0855), rel=1e-4)
    # Mg2SiO4: oxygen is lightest; adding heavy atoms does not change the step.
    assert timestep_from_masses([12, 14, 8]) == timestep_from_masses([8])
    ratio = timestep_from_masses([8], max_fs=10) / timestep_from_masses([3], max_fs=10)
    assert ratio == pytest.approx(np.sqrt(15.999 / 6.94), rel=1e-3)
    assert timestep_from_masses([1]) == pytest.approx(0.38 * np.sqrt(1.008), rel=1e-4)
    assert timestep_from_masses([1], min_fs=0.5) == 0.5


def test_maxwell_boltzmann_has_exact_temperature_and_no_drift():
    atoms = copper()
    maxwell_boltzmann(atoms, 1234.0, np.random.default_rng(1))
    assert atoms.get_temperature() == pytest.approx(1234.0, rel=1e-9)
    assert np.allclose(atoms.get_momenta().sum(axis=0), 0.0, atol=1e-10)


@pytest.mark.parametrize("thermostat", THERMOSTATS)
def test_thermostats_hold_and_follow_the_target_temperature(thermostat):
    atoms = copper()
    driver = MDDriver(atoms, EMT(), rng=np.random.default_rng(2), thermostat=thermostat, timestep_fs=2.0,
                      coupling_fs=50.0, msd_interval=1)
    hot = driver.run(Segment("hold", 300, 800.0))
    assert hot.mean_temperature_K == pytest.approx(800.0, rel=0.2)
    ramp = driver.run(Segment("ramp", 300, 800.0, final_temperature_K=200.0))
    assert ramp.target_temperature_K == 200.0
    # The mean over the second half of a linear ramp 800 -> 200 K is about 350 K.
    assert 200.0 < ramp.mean_temperature_K < 500.0


def test_every_md_step_is_one_counted_oracle_call():
    oracle = build_oracle(OracleConfig(name="emt"))
    driver = MDDriver(copper(), oracle.calculator, rng=np.random.default_rng(3), timestep_fs=2.0, frame_interval=5)
    result = driver.run(Segment("liquid", 40, 500.0))
    assert oracle.calls == 40 + 1  # the initial forces, then one per step
    assert result.n_frames == 8 and len(result.frames) == 8
    frame = result.frames[-1]
    assert frame.info["phase"] == "liquid"
    # A frame's labels are the oracle's values at that frame's positions.
    reference = frame.copy()
    reference.calc = EMT()
    assert frame.get_potential_energy() == pytest.approx(reference.get_potential_energy(), abs=1e-10)
    assert np.allclose(frame.get_forces(), reference.get_forces(), atol=1e-10)
    assert np.allclose(frame.get_stress(), reference.get_stress(), atol=1e-10)


def test_ideal_gas_pressure_is_nkT_over_V():
    atoms = copper()
    atoms.calc = NoForces()
    maxwell_boltzmann(atoms, 1000.0, np.random.default_rng(4))
    expected = len(atoms) * units.kB * atoms.get_temperature() / atoms.get_volume() * 160.21766208
    assert total_pressure_gpa(atoms) == pytest.approx(expected, rel=1e-6)


def test_msd_ignores_wrapping_drift_and_counts_diffusion():
    rng = np.random.default_rng(5)
    atoms = copper()
    tracker = MSDTracker(atoms)
    steps = rng.normal(scale=0.2, size=(300, len(atoms), 3))
    unwrapped = atoms.get_positions().copy()
    for i, step in enumerate(steps):
        unwrapped += step + np.array([0.3, 0.0, -0.1])  # plus a uniform drift
        atoms.set_positions(unwrapped)
        atoms.wrap()  # the tracker must see through wrapping
        tracker.update(atoms)
        tracker.sample(10.0 * (i + 1))
    walk = steps.sum(axis=0)
    walk -= walk.mean(axis=0)
    assert tracker.msd() == pytest.approx(np.mean(np.sum(walk**2, axis=1)), rel=1e-9)
    # A random walk of 0.2 Å per 10 fs per axis: MSD grows at 3·0.04 Å² per 10 fs = 12 Å²/ps.
    assert tracker.slope(skip_fraction=0.0, min_lag_fs=50.0) == pytest.approx(12.0, rel=0.2)


def test_msd_slope_of_vibrating_atoms_is_zero():
    """Atoms oscillating about fixed sites (a solid): the MSD plateaus, its slope past min_lag is ~0."""
    rng = np.random.default_rng(6)
    atoms = copper()
    sites = atoms.get_positions().copy()
    tracker = MSDTracker(atoms)
    phase = rng.uniform(0, 2 * np.pi, size=(len(atoms), 3))
    for i in range(200):
        t = 5.0 * (i + 1)  # fs; a 60 fs period, 0.15 Å amplitude
        atoms.set_positions(sites + 0.15 * np.sin(2 * np.pi * t / 60.0 + phase))
        tracker.update(atoms)
        tracker.sample(t)
    assert abs(tracker.slope()) < 0.05


def test_msd_of_a_uniformly_rescaled_solid_is_small():
    atoms = copper()
    tracker = MSDTracker(atoms)
    atoms.set_cell(atoms.cell * 1.05, scale_atoms=True)
    tracker.update(atoms)
    # Rescaling moves atoms (affinely) but by less than the cell; no wrap-around jumps.
    assert tracker.msd() < 0.5


@pytest.mark.parametrize("thermostat", THERMOSTATS)
def test_resume_from_checkpoint_is_identical_to_an_uninterrupted_run(tmp_path, thermostat):
    segment = Segment("liquid", 60, 900.0, final_temperature_K=600.0)

    def new_driver():
        return MDDriver(copper(), EMT(), rng=np.random.default_rng(6), thermostat=thermostat, timestep_fs=2.0,
                        frame_interval=10, checkpoint_every=20)

    straight = new_driver()
    reference = straight.run(segment)

    class Killed(Exception):
        pass

    checkpoint = Checkpoint(tmp_path / "ckpt")
    info = {"frame_chunks": []}

    def save(progress, frames, driver, kill_at=None):
        nonlocal info
        state, arrays = driver_state(driver, progress)
        info = checkpoint.save({**state, "frame_chunks": info["frame_chunks"]}, arrays, frames)
        if progress.step == kill_at:
            raise Killed

    first = new_driver()
    with pytest.raises(Killed):
        first.run(segment, on_checkpoint=lambda p, f: save(p, f, first, kill_at=40))
    second = new_driver()
    loaded, arrays = checkpoint.load()
    progress = restore_driver_state(second, loaded, arrays)
    assert progress.step == 40
    second.run(segment, progress, on_checkpoint=lambda p, f: save(p, f, second))
    # Same trajectory up to round-off (a fresh calculator builds a fresh neighbour list).
    assert np.allclose(second.atoms.positions, straight.atoms.positions, atol=1e-9, rtol=0)
    assert np.allclose(second.atoms.get_momenta(), straight.atoms.get_momenta(), atol=1e-9, rtol=0)
    frames = checkpoint.frames(checkpoint.load()[0])
    assert len(frames) == len(reference.frames) == 6
    assert np.allclose([f.get_potential_energy() for f in frames],
                       [f.get_potential_energy() for f in reference.frames], atol=1e-9, rtol=0)


def test_checkpoint_ignores_uncommitted_chunks_and_rejects_corruption(tmp_path):
    checkpoint = Checkpoint(tmp_path)
    frame = copper()
    frame.info["phase"] = "liquid"
    info = checkpoint.save({"frame_chunks": []}, {"x": np.arange(3)}, [frame])
    # A chunk written by a run killed before its commit is not part of the state.
    (checkpoint.frames_dir / "chunk_000001.extxyz").write_text("garbage")
    loaded, arrays = checkpoint.load()
    assert loaded["frame_chunks"] == info["frame_chunks"] == ["chunk_000000.extxyz"]
    assert np.array_equal(arrays["x"], np.arange(3))
    assert len(checkpoint.frames(loaded)) == 1
    checkpoint.path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="delete"):
        checkpoint.load()


def test_msd_history_is_thinned_and_survives_a_checkpoint():
    atoms = copper()
    tracker = MSDTracker(atoms, max_samples=10)
    for i in range(45):
        atoms.positions += 0.01
        tracker.update(atoms)
        tracker.sample(5.0 * (i + 1))
    assert len(tracker.history) <= 10 and tracker.stride == 8
    assert np.allclose(np.diff(tracker.times_fs), 5.0 * tracker.stride)  # still evenly spaced
    info, arrays = tracker.state()
    restored = MSDTracker.from_state(atoms, info, arrays)
    assert restored.slope() == tracker.slope() and restored.msd() == tracker.msd()
