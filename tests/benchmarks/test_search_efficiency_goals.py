"""The goal verdicts of benchmarks/search_efficiency.py, on hand-made rows."""

from pathlib import Path

import pytest

BENCHMARK = "search_efficiency"


def run(method, mode, seed, found, calls, budget=3000, to_target=None):
    return {"system": "X", "method": method, "mode": mode, "seed": seed, "found": found, "oracle_calls": calls,
            "budget": budget, "oracle_calls_to_target": to_target if found else None}


def active(mode, calls, found=True):
    return [run("active", mode, s, found, c) for s, c in enumerate(calls)]


def random_missed(mode, budget=3000):
    return [run("random", mode, s, False, budget + 20, budget=budget) for s in range(3)]


def test_random_search_missing_at_the_3000_cap_counts_as_needing_more(bench):
    rows = active("random", [170, 267, 290]) + random_missed("random")
    check = bench.goals(rows)["X"]["tenfold_where_random_above_3000"]["random"]
    assert check == {"random_median_calls": 3000, "lower_bound": True, "active_median_calls": 267, "met": True}


def test_a_lower_bound_within_ten_times_the_active_calls_leaves_the_goal_undecided(bench):
    rows = active("random", [400, 500, 600]) + random_missed("random")
    assert bench.goals(rows)["X"]["tenfold_where_random_above_3000"]["random"]["met"] is None


def test_a_missed_active_run_fails_the_goal(bench):
    rows = active("random", [170, 267]) + active("random", [600], found=False) + random_missed("random")
    assert bench.goals(rows)["X"]["tenfold_where_random_above_3000"]["random"]["met"] is False


def test_measured_random_medians_decide_and_modes_are_judged_apart(bench):
    measured = [run("random", "symmetric", s, True, c, budget=20000, to_target=c) for s, c in enumerate([4370, 4028, 2412])]
    rows = active("symmetric", [449, 402, 394]) + measured + active("random", [900]) + random_missed("random")
    tenfold = bench.goals(rows)["X"]["tenfold_where_random_above_3000"]
    assert tenfold["symmetric"]["met"] is True  # 10 x 402 <= 4028
    assert tenfold["random"]["met"] is None  # 10 x 900 > 3000, a lower bound


def test_seed_004_comparison_sets_symmetric_active_runs_against_fully_random_search(bench):
    rows = active("symmetric", [420, 450, 560]) + random_missed("random", budget=6000)
    tenfold = bench.goals(rows)["X"]["tenfold_where_random_above_3000"]
    assert list(tenfold) == [bench.SEED004_COMPARISON]  # no active runs from fully random candidates
    assert tenfold[bench.SEED004_COMPARISON] == {"random_median_calls": 6000, "lower_bound": True,
                                                 "active_median_calls": 450, "met": True}


def test_random_search_below_3000_calls_sets_no_tenfold_goal(bench):
    quick = [run("random", "symmetric", s, True, 150, to_target=150) for s in range(3)]
    assert bench.goals(active("symmetric", [200, 210, 220]) + quick)["X"]["tenfold_where_random_above_3000"] is None


def test_reuse_takes_symmetric_runs_only_from_a_file_whose_candidates_filled_the_same_cell(bench, tmp_path):
    import json

    symmetric = active("symmetric", [300]) + random_missed("symmetric")
    fully_random = active("random", [280])
    old = tmp_path / "conventional.json"
    relax = bench.RELAX_DEFAULTS
    old.write_text(json.dumps({"oracle": "sevennet", "runs": symmetric + fully_random, "active_overrides": {},
                               "relax_defaults": relax, "active_defaults": bench.ACTIVE_DEFAULTS}))  # before --cell
    new = tmp_path / "primitive.json"
    new.write_text(json.dumps({"oracle": "sevennet", "runs": symmetric, "active_overrides": {}, "cell": "primitive",
                               "relax_defaults": relax, "active_defaults": bench.ACTIVE_DEFAULTS}))
    taken, _ = bench.reusable_rows([old, new], "sevennet", {"random", "active"}, {}, "primitive")
    assert {key: row["reused_from"].split()[0] for key, row in taken.items() if key[1] == "symmetric"} == \
        dict.fromkeys([("X", "symmetric", 0, "active")] + [("X", "symmetric", s, "random") for s in range(3)],
                      "primitive.json")
    assert taken[("X", "random", 0, "active")]["reused_from"].startswith("conventional.json")  # no cell to differ
    taken, _ = bench.reusable_rows([old, new], "sevennet", {"random", "active"}, {}, "conventional")
    assert len(taken) == 5 and all(row["reused_from"].startswith("conventional.json") for row in taken.values())


def test_reuse_skips_active_runs_made_with_other_relax_or_active_defaults(bench, tmp_path):
    import json

    rows = active("symmetric", [300]) + random_missed("symmetric")
    legacy = tmp_path / "legacy.json"  # written before files recorded [relax]: validation used FIRE
    legacy.write_text(json.dumps({"oracle": "sevennet", "runs": rows, "active_overrides": {}}))
    taken, _ = bench.reusable_rows([legacy], "sevennet", {"random", "active"}, {})
    assert {key[3] for key in taken} == {"random"}
    other_search = tmp_path / "other_search.json"
    other_search.write_text(json.dumps({"oracle": "sevennet", "runs": rows, "active_overrides": {},
                                        "relax_defaults": {**bench.RELAX_DEFAULTS, "fmax": 0.1}}))
    taken, _ = bench.reusable_rows([other_search], "sevennet", {"random", "active"}, {})
    assert taken == {}
    older_rule = {k: v for k, v in bench.ACTIVE_DEFAULTS.items() if k != "degenerate_window"}  # before the key
    before = tmp_path / "before_degenerate_window.json"
    before.write_text(json.dumps({"oracle": "sevennet", "runs": rows, "active_overrides": {},
                                  "relax_defaults": bench.RELAX_DEFAULTS, "active_defaults": older_rule}))
    taken, _ = bench.reusable_rows([before], "sevennet", {"random", "active"}, {})
    assert {key[3] for key in taken} == {"random"}
    assert bench._changed(older_rule, bench.ACTIVE_DEFAULTS) == "degenerate_window unset"
    current = tmp_path / "current.json"
    current.write_text(json.dumps({"oracle": "sevennet", "runs": rows, "active_overrides": {},
                                   "relax_defaults": bench.RELAX_DEFAULTS, "active_defaults": bench.ACTIVE_DEFAULTS}))
    taken, _ = bench.reusable_rows([current], "sevennet", {"random", "active"}, {})
    assert {key[3] for key in taken} == {"random", "active"}


def test_settings_files_load_and_bad_ones_fail_before_any_run(bench, tmp_path):
    for path in sorted((Path(bench.__file__).parent / "settings").glob("*.toml")):
        overrides = bench.settings_overrides(path)
        config = bench.method_config(bench.base_config("Si16", 0, "symmetric", "sw", tmp_path), "active", 100,
                                     "symmetric", overrides)
        assert config.active.per_spacegroup == overrides["active"]["per_spacegroup"]
    assert bench.settings_overrides(None) == {}
    bad = tmp_path / "bad.toml"
    bad.write_text("[active]\nbatch_sise = 30\n")
    with pytest.raises(SystemExit, match="batch_sise"):
        bench.settings_overrides(bad)
    bad.write_text("[structures]\ncell = 'primitive'\n")
    with pytest.raises(SystemExit, match="--cell"):
        bench.settings_overrides(bad)
