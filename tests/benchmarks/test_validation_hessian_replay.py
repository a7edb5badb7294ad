"""The run figures of benchmarks/validation_hessian.py, on a hand-made replay."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCHMARK = "validation_hessian"


def relaxation(calls, energy, sg, target=False):
    return {"calls": calls, "energy_per_atom": energy, "spacegroup": sg, "matches_target": target}


def replay(bench, tmp_path, to_target):
    # 400 calls of labels, then three validations of 20, 30 and 10 calls: 460 in all.
    (tmp_path / "summary.json").write_text(json.dumps({"oracle_calls": 460, "oracle_calls_to_target": to_target}))
    records = [SimpleNamespace(oracle_calls=c, oracle_calls_total=t) for c, t in ((20, 420), (30, 450), (10, 460))]
    rows = [
        {"stored_calls": 20, "identity": relaxation(20, -5.30, 139), "model": relaxation(4, -5.3001, 139)},
        {"stored_calls": 30, "identity": relaxation(30, -5.40, 227, True), "model": relaxation(5, -5.4002, 227, True)},
        {"stored_calls": 10, "identity": relaxation(10, -5.20, 12), "model": relaxation(3, -5.25, 12)},
    ]
    return bench._run_figures(tmp_path, records, rows)


def test_target_found_in_validation_is_reached_after_the_model_started_validations(bench, tmp_path):
    figures = replay(bench, tmp_path, to_target=450)
    assert figures["calls_before_validation"] == 400
    assert figures["validation_calls"] == {"stored": 60, "identity": 60, "model": 12}
    assert figures["calls_in_all"] == {"stored": 460, "model": 412}
    assert figures["calls_to_target"] == {"stored": 450, "model": 409}
    assert figures["same_minimum"] == 2  # the third ended 50 meV/atom lower: another minimum


def test_target_found_among_the_labels_keeps_its_calls(bench, tmp_path):
    assert replay(bench, tmp_path, to_target=250)["calls_to_target"] == {"stored": 250, "model": 250}
