"""Run-directory files: atomic JSON, summary, log, lock."""

import json
import logging

import numpy as np
import pytest

from xtalforge.errors import CheckpointError
from xtalforge.store import (
    open_log,
    read_summary,
    run_lock,
    write_json_atomic,
    write_summary,
)


def test_write_json_atomic_round_trip_and_numpy(tmp_path):
    path = write_json_atomic(tmp_path / "a" / "x.json", {"n": np.int64(3), "e": np.float32(0.5), "v": np.arange(3)})
    assert json.loads(path.read_text()) == {"n": 3, "e": 0.5, "v": [0, 1, 2]}
    assert path.stat().st_mode & 0o044  # readable by others, like any file a run writes


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = write_json_atomic(tmp_path / "x.json", {"ok": True})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    with pytest.raises(ValueError):
        write_json_atomic(path, {"nan": float("nan")})  # not valid JSON
    assert json.loads(path.read_text()) == {"ok": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_summary_round_trip_missing_and_corrupt(tmp_path):
    assert read_summary(tmp_path) is None
    write_summary(tmp_path, {"composition": "Si8", "best": None})
    assert read_summary(tmp_path) == {"composition": "Si8", "best": None}
    (tmp_path / "summary.json").write_text('{"composition": "Si8", "be')
    with pytest.raises(CheckpointError) as info:
        read_summary(tmp_path)
    assert "summary.json" in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "summary.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        read_summary(tmp_path)


def test_open_log_appends_without_duplicate_handlers(tmp_path):
    log = open_log(tmp_path)
    log.info("first")
    log = open_log(tmp_path)  # a resumed session opens the log again
    log.info("second")
    log.debug("hidden at INFO")
    for handler in log.handlers:
        handler.flush()
    lines = (tmp_path / "run.log").read_text().splitlines()
    assert [line.split(" INFO ")[-1] for line in lines] == ["first", "second"]
    assert all(" INFO " in line for line in lines)
    assert open_log(tmp_path / "other") is not log
    assert log.level == logging.INFO


def test_run_lock_excludes_a_second_writer(tmp_path):
    holding = run_lock(tmp_path)
    with holding, pytest.raises(CheckpointError, match="in use by another xtalforge process"), run_lock(tmp_path):
        pass
    with run_lock(tmp_path):  # released on exit
        pass
