"""Melt–quench–anneal protocol with the Stillinger–Weber oracle, through the CLI.

One short protocol on Si16 (about 1000 MD steps) checks the physics: a liquid above the
melting temperature, a solid after the quench. A tiny one on Si8 is killed mid-run in a
subprocess, resumed, and must end with the dataset of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ase.io import read

from xtalforge.config import MeltQuenchConfig, OracleConfig, from_dict
from xtalforge.datasets.commands import load_dataset_config, register
from xtalforge.datasets.meltquench import MeltQuenchProtocol, OracleLabeller, md_composition, run_meltquench, volume_change
from xtalforge.dynamics.md import Checkpoint, SegmentResult
from xtalforge.errors import CheckpointError, ConfigError
from xtalforge.oracles import build_oracle
from xtalforge.structures.composition import Composition

# The laptop protocol shrunk to ~1000 steps. A 16-atom cell needs ~0.4 ps per stage to tell
# a liquid from a solid; the search tries one temperature far above SW silicon's T_m (1690 K)
# (the solid branch of the search is checked with synthetic results below).
SHORT = {
    "n_atoms": 16, "coupling_fs": 50.0, "superheat_K": 4000.0, "superheat_ps": 0.2,
    "melt_search_start_K": 3000.0, "melt_search_step_K": 500.0, "melt_search_min_K": 3000.0, "melt_search_ps": 0.4,
    "volume_ps": 0.1, "volume_max_iterations": 1, "liquid_ps": 0.4, "quench_rate_K_per_ps": 10000.0,
    "anneal_ps": 0.6, "checkpoint_every": 100,
}
# Physics does not matter here, only that there are several checkpoints to be killed between.
TINY = {
    "n_atoms": 8, "superheat_ps": 0.1, "melt_search_start_K": 3000.0, "melt_search_min_K": 3000.0,
    "melt_search_ps": 0.1, "volume_ps": 0.04, "volume_max_iterations": 2, "liquid_ps": 0.1,
    "quench_rate_K_per_ps": 20000.0, "anneal_ps": 0.1, "checkpoint_every": 20,
}


def toml(settings: dict, seed: int) -> str:
    lines = [f'composition = "Si"', f"seed = {seed}", "", "[oracle]", 'name = "sw"', "", "[meltquench]"]
    return "\n".join(lines + [f"{k} = {v!r}" for k, v in settings.items()]) + "\n"


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="xtalforge")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "si.toml"
    path.write_text(toml(SHORT, seed=3))
    return path


@pytest.fixture(scope="module")
def run(config_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("meltquench")
    assert cli(["dataset", "meltquench", str(config_path), "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "meltquench.json").read_text())
    frames = read(out / "dataset.extxyz", index=":")
    return out, report, frames


def test_report_has_the_promised_fields(run):
    _, report, frames = run
    for key in ("melting_temperature_K", "volume_per_atom", "n_frames", "oracle_calls", "wall_time_s"):
        assert key in report
    assert report["n_atoms"] == 16 and report["composition"] == "Si16"
    assert report["timestep_fs"] == 2.0  # from silicon's mass
    assert set(report["n_frames"]) == {"superheat", "liquid", "quench", "anneal"}
    assert sum(report["n_frames"].values()) == len(frames)
    # superheat 100 steps, liquid 200, anneal 300, quench (3000 - 300) K at 10 K/fs = 135: a frame every 10 steps
    assert report["melting_temperature_K"] == 3000.0
    assert report["n_frames"] == {"superheat": 10, "liquid": 20, "quench": 13, "anneal": 30}
    # Every MD step is an oracle call (plus one per fresh start or volume change), kept or not.
    assert report["md_steps"] <= report["oracle_calls"] <= report["md_steps"] + 5
    assert report["oracle_calls"] > 8 * len(frames)
    assert 10.0 < report["volume_per_atom"] < 30.0


def test_frames_carry_oracle_labels_and_phases(run):
    _, _, frames = run
    oracle = build_oracle(OracleConfig(name="sw"))
    phases = [f.info["phase"] for f in frames]
    # Phases come in protocol order.
    order = ["superheat", "liquid", "quench", "anneal"]
    assert [order.index(p) for p in phases] == sorted(order.index(p) for p in phases)
    for frame in frames[::9]:
        assert frame.get_forces().shape == (16, 3) and frame.get_stress().shape == (6,)
        label = oracle.single_point(frame)
        # extxyz stores positions to 1e-8 Å, hence the tolerances
        assert frame.get_potential_energy() == pytest.approx(label.energy, abs=1e-5)
        assert np.allclose(frame.get_forces(), label.forces, atol=1e-5)
        assert np.allclose(frame.get_stress(), label.stress, atol=1e-7)
    quench = [f.info["temperature_K"] for f in frames if f.info["phase"] == "quench"]
    assert quench == sorted(quench, reverse=True)  # the target temperature falls during the quench


def test_melting_search_finds_a_liquid_and_the_anneal_a_solid(run):
    _, report, _ = run
    threshold = MeltQuenchConfig().liquid_msd_slope
    segments = {s["phase"]: s for s in report["segments"]}
    assert segments["superheat"]["msd_slope_A2_per_ps"] > threshold
    assert report["melt_search"] == [
        {"temperature_K": 3000.0, "msd_slope": pytest.approx(report["melt_search"][0]["msd_slope"]), "liquid": True}
    ]
    assert report["melt_search"][0]["msd_slope"] > threshold
    # The NVT run at T_m, after the volume change, is a liquid: the MSD keeps growing linearly.
    assert segments["liquid"]["target_temperature_K"] == report["melting_temperature_K"]
    assert segments["liquid"]["msd_slope_A2_per_ps"] > threshold
    assert segments["liquid"]["msd_final_A2"] > 1.0  # a solid vibrates with an MSD of ~0.05 Å²
    # After the quench the anneal at 500 K is a solid.
    assert segments["anneal"]["target_temperature_K"] == 500.0
    assert report["anneal_is_solid"] is True
    assert report["anneal_msd_slope"] < threshold


def fake_result(phase: str, temperature: float, slope: float, pressure: float = 0.0) -> SegmentResult:
    return SegmentResult(phase=phase, n_steps=10, target_temperature_K=temperature, mean_temperature_K=temperature,
                         mean_pressure_gpa=pressure, msd_slope_A2_per_ps=slope, msd_final_A2=1.0, n_frames=0)


def test_search_takes_the_lowest_liquid_temperature_and_goes_back_to_that_liquid(si_diamond, tmp_path):
    settings = from_dict(MeltQuenchConfig, {"melt_search_step_K": 1000.0, "melt_search_min_K": 1000.0})
    atoms = si_diamond.copy()
    protocol = MeltQuenchProtocol(atoms, settings, OracleLabeller(build_oracle(OracleConfig(name="sw")), []),
                                  tmp_path, rng=np.random.default_rng(0))
    assert protocol.search_temperatures() == [3000.0, 2000.0, 1000.0]
    protocol.finish_segment(protocol.next_segment(), fake_result("superheat", 4000.0, 20.0))
    assert protocol.state.stage == "melt_search" and protocol.next_segment().temperature_K == 3000.0
    protocol.finish_segment(protocol.next_segment(), fake_result("melt_search", 3000.0, 8.0))
    liquid_positions = atoms.positions.copy()
    assert protocol.next_segment().temperature_K == 2000.0
    atoms.positions += 0.3  # what MD at 2000 K would have done
    protocol.finish_segment(protocol.next_segment(), fake_result("melt_search", 2000.0, 0.2))
    # Solid at 2000 K: T_m is 3000 K and the cell goes back to its last liquid state.
    assert protocol.state.melting_temperature_K == 3000.0
    assert np.array_equal(atoms.positions, liquid_positions)
    assert protocol.state.stage == "volume"
    volume = atoms.get_volume()
    protocol.finish_segment(protocol.next_segment(), fake_result("volume", 3000.0, 8.0, pressure=-5.0))
    assert atoms.get_volume() == pytest.approx(volume * (1 - 5.0 / settings.bulk_modulus_gpa))
    protocol.finish_segment(protocol.next_segment(), fake_result("volume", 3000.0, 8.0, pressure=0.1))
    assert protocol.state.pressure_converged and protocol.state.stage == "liquid"
    quench = [protocol.next_segment()]
    protocol.finish_segment(quench[0], fake_result("liquid", 3000.0, 8.0))
    segment = protocol.next_segment()
    assert (segment.phase, segment.temperature_K, segment.final_temperature_K) == ("quench", 3000.0, 300.0)
    # 2700 K at 200 K/ps is 13.5 ps = 6750 steps of 2 fs
    assert segment.n_steps == 6750


def test_killed_run_resumes_to_the_same_dataset(tmp_path):
    config_path = tmp_path / "tiny.toml"
    config_path.write_text(toml(TINY, seed=1))
    reference_dir, out = tmp_path / "reference", tmp_path / "killed"
    assert cli(["dataset", "meltquench", str(config_path), "--out", str(reference_dir), "--no-progress"]) == 0
    reference = json.loads((reference_dir / "meltquench.json").read_text())
    reference_frames = read(reference_dir / "dataset.extxyz", index=":")
    script = ("import argparse, sys; from xtalforge.datasets.commands import register; "
              "p = argparse.ArgumentParser(); register(p.add_subparsers()); "
              "a = p.parse_args(['dataset', 'meltquench', sys.argv[1], '--out', sys.argv[2], '--no-progress']); "
              "sys.exit(a.func(a))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, str(config_path), str(out)], env=env)
    checkpoint = Checkpoint(out / "checkpoint")
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if checkpoint.exists() and checkpoint.load()[0]["protocol"]["stage"] != "superheat":
                break
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    info, _ = checkpoint.load()
    assert info["protocol"]["stage"] != "done" and not (out / "dataset.extxyz").exists(), "the run was not killed mid-way"
    assert cli(["dataset", "meltquench", str(config_path), "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "meltquench.json").read_text())
    frames = read(out / "dataset.extxyz", index=":")
    assert report["n_frames"] == reference["n_frames"]
    assert report["md_steps"] == reference["md_steps"]
    pressures = [h["pressure_gpa"] for h in report["volume_history"]]
    assert pressures == pytest.approx([h["pressure_gpa"] for h in reference["volume_history"]])
    # The resumed trajectory is the uninterrupted one (same random stream, same state).
    assert np.allclose([f.get_potential_energy() for f in frames],
                       [f.get_potential_energy() for f in reference_frames], atol=1e-6)
    assert np.allclose(frames[-1].positions, reference_frames[-1].positions, atol=1e-6)
    # Rerunning a finished run does no more MD.
    assert cli(["dataset", "meltquench", str(config_path), "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "meltquench.json").read_text())["md_steps"] == report["md_steps"]


def test_resume_with_other_settings_is_refused(run, tmp_path):
    out, _, _ = run
    settings = from_dict(MeltQuenchConfig, {**SHORT, "anneal_ps": 0.5})
    oracle = build_oracle(OracleConfig(name="sw"))
    with pytest.raises(CheckpointError, match="other \\[meltquench\\] settings"):
        run_meltquench(Composition.parse("Si16"), settings, oracle, out)


def test_md_composition_uses_whole_formula_units():
    assert md_composition(Composition.parse("Mg2SiO4"), 64).formula == "Mg18Si9O36"
    assert md_composition(Composition.parse("Si"), 64).n_atoms == 64
    assert md_composition(Composition.parse("Mg2SiO4", 4), 0).formula == "Mg8Si4O16"
    assert md_composition(Composition.parse("LiAlCl4"), 3).as_dict() == {"Li": 1, "Al": 1, "Cl": 4}


def test_volume_change_is_a_secant_newton_step():
    # Linear P(V) through (20, -5) and (18, +5): the root is V = 19.
    history = [{"volume_per_atom": 20.0, "pressure_gpa": -5.0}, {"volume_per_atom": 18.0, "pressure_gpa": 5.0}]
    assert 18.0 * (1 + volume_change(history, 50.0, 0.2)) == pytest.approx(19.0)
    # One point: the guessed bulk modulus, clipped to the largest step.
    assert volume_change(history[:1], 50.0, 0.2) == pytest.approx(-0.1)
    assert volume_change(history[:1], 10.0, 0.2) == pytest.approx(-0.2)
    # A noisy, non-physical slope (pressure rising with volume) falls back to the guess.
    noisy = [{"volume_per_atom": 20.0, "pressure_gpa": 1.0}, {"volume_per_atom": 19.0, "pressure_gpa": 0.9}]
    assert volume_change(noisy, 50.0, 0.2) == pytest.approx(0.9 / 50.0)


def test_config_sections_are_validated(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('composition = "Si"\n[meltquench]\nsuperheat_k = 4000\n')
    with pytest.raises(ConfigError, match="meltquench.superheat_k"):
        load_dataset_config(path)
    path.write_text('composition = "Si"\n[meltquench]\nn_atoms = 8\n[onthefly]\nretrain_every = 3\n')
    config, settings, onthefly = load_dataset_config(path)
    assert settings.n_atoms == 8 and onthefly.retrain_every == 3 and config.composition == "Si"
