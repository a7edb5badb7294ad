"""End-to-end random search with the Stillinger-Weber oracle, and kill-and-resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from xtalforge.config import load_config
from xtalforge.errors import ConfigError
from xtalforge.search import run_search
from xtalforge.similarity import matches
from xtalforge.store import RunStore


def test_random_search_finds_diamond_si8(sw_config_file, tmp_path, si_diamond):
    config = load_config(sw_config_file)
    summary = run_search(config, tmp_path / "run", progress=False)
    assert summary["target_found"] is True
    assert 0 < summary["oracle_calls_to_target"] <= summary["oracle_calls"] <= config.search.max_oracle_calls
    from ase.io import read

    best = read(tmp_path / "run" / summary["best"]["cif"])
    assert matches(best, si_diamond)
    assert summary["best"]["spacegroup"].startswith("Fd-3m")
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["oracle_calls"] == summary["oracle_calls"]
    assert (tmp_path / "run" / "config.toml").exists() and (tmp_path / "run" / "run.log").exists()
    store = RunStore(tmp_path / "run")
    assert sum(r.oracle_calls for r in store.records()) == summary["oracle_calls"]
    # The best structure was relaxed again at the validation thresholds; the search stopped at the
    # target, so validation stopped after it too.
    validated = store.records(stage="validation")
    assert [r.candidate for r in validated] == [summary["best"]["candidate"]]
    assert summary["best"]["stage"] == "validation" and validated[0].extra["matches_target"]
    assert validated[0].extra["start_hessian"] == "identity"  # random search has no model to take it from


def test_random_search_validates_its_best_distinct_structures(tmp_path):
    path = tmp_path / "top.toml"
    path.write_text('composition = "Si8"\nseed = 3\n[oracle]\nname = "sw"\n[search]\nmethod = "random"\n'
                    "max_candidates = 6\nvalidate_top = 2\n")
    summary = run_search(load_config(path), tmp_path / "run", progress=False)
    store = RunStore(tmp_path / "run")
    validated = store.records(stage="validation")
    assert len(validated) == 2 and not matches(validated[0].relaxed, validated[1].relaxed)
    search_best = store.best(1, stages=("search",))[0]
    assert validated[0].candidate == search_best.candidate
    assert all(r.energy_per_atom <= r.extra["predicted_energy_per_atom"] + 1e-3 for r in validated)
    assert summary["oracle_calls"] == sum(r.oracle_calls for r in store.records())
    path.write_text(path.read_text().replace("validate_top = 2", "validate_top = 0"))
    run_search(load_config(path), tmp_path / "off", progress=False)
    assert RunStore(tmp_path / "off").records(stage="validation") == []


def _write_config(path, max_candidates):
    path.write_text(
        f'composition = "Si8"\nseed = 3\n[oracle]\nname = "sw"\n[search]\nmethod = "random"\n'
        f"max_oracle_calls = 100000\nmax_candidates = {max_candidates}\n"
    )
    return path


def test_kill_and_resume_repeats_no_work(tmp_path):
    n = 10
    reference = run_search(load_config(_write_config(tmp_path / "a.toml", n)), tmp_path / "uninterrupted", progress=False)
    config_file = _write_config(tmp_path / "b.toml", n)
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "xtalforge.cli", "search", str(config_file), "--out", str(run_dir), "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "structures.db").exists() and RunStore(run_dir).count() >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "search finished before it could be killed: make the test run longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = RunStore(run_dir).done_candidates()
    assert 2 <= len(done_before) < n
    resumed = run_search(load_config(config_file), run_dir, progress=False)
    assert resumed["oracle_calls"] == reference["oracle_calls"]
    assert resumed["n_candidates"] == reference["n_candidates"] == n
    energies = lambda d: sorted((r.candidate, round(r.energy_per_atom or 0, 8)) for r in RunStore(d).records())
    assert energies(run_dir) == energies(tmp_path / "uninterrupted")


def test_resume_with_other_composition_is_refused(tmp_path):
    run_search(load_config(_write_config(tmp_path / "a.toml", 1)), tmp_path / "run", progress=False)
    other = tmp_path / "c.toml"
    other.write_text('composition = "Si6"\n[oracle]\nname = "sw"\n[search]\nmax_candidates = 1\n')
    with pytest.raises(ConfigError, match="holds a run with composition"):
        run_search(load_config(other), tmp_path / "run", progress=False)


@pytest.mark.parametrize(
    "line, problem",
    [
        ("max_oracle_calls = 0", "search.max_oracle_calls must be at least 1"),
        ("max_candidates = 0", "search.max_candidates must be at least 1"),
        ("max_wall_time_s = -5.0", "search.max_wall_time_s must be positive"),
        ("top_k = 0", "search.top_k must be at least 1"),
        ("energy_tol = -0.01", "search.energy_tol is an energy window"),
        ("validate_top = -1", "search.validate_top must not be negative"),
    ],
)
def test_out_of_range_search_settings_are_one_line_errors_before_the_run_starts(tmp_path, line, problem):
    path = tmp_path / "bad.toml"
    path.write_text(f'composition = "Si8"\n[oracle]\nname = "sw"\n[search]\n{line}\n')
    with pytest.raises(ConfigError, match=problem) as err:
        run_search(load_config(path), tmp_path / "run", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_structures_relaxed_into_pairs_below_the_generation_minimum_are_unphysical(reference_dir):
    from types import SimpleNamespace

    from ase.io import read

    from xtalforge.config import RelaxConfig, StructuresConfig
    from xtalforge.search.outcome import collapsed_pairs
    from xtalforge.structures.composition import Composition
    from xtalforge.structures.constraints import Constraints

    constraints = Constraints.from_config(Composition.parse("Si8"), StructuresConfig(min_distances={"Si-Si": 1.6}))
    ctx = SimpleNamespace(constraints=constraints, config=SimpleNamespace(relax=RelaxConfig()))
    diamond = read(reference_dir / "Si_diamond_Fd-3m.cif")
    assert collapsed_pairs(ctx, diamond) is None
    squeezed = diamond.copy()
    squeezed.set_cell(diamond.cell * 0.62, scale_atoms=True)  # bonds 2.35 -> 1.46 Å: above 0.5 x 1.6, below 1.6
    problem = collapsed_pairs(ctx, squeezed)
    assert problem is not None and "unphysical" in problem
