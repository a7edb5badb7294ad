"""Checkpoint of the active-learning search: phases, files, corrupt or foreign checkpoints."""

import json

import pytest

from xtalforge.errors import CheckpointError
from xtalforge.search.active_state import ActiveState, CycleSummary, read_cycles


def test_phases_advance_and_survive_a_reload(tmp_path):
    state = ActiveState.load(tmp_path)
    assert (state.cycle, state.phase, state.last_finished_cycle, state.stopped) == (0, "evaluated", 0, False)
    assert state.done(0, "evaluated") and not state.done(1, "selected")

    state.pending = {"noise": 0.24}
    state.advance(1, "labelled")
    assert state.done(1, "selected") and state.done(1, "labelled") and not state.done(1, "trained")
    assert state.last_finished_cycle == 0

    reloaded = ActiveState.load(tmp_path)
    assert (reloaded.cycle, reloaded.phase, reloaded.pending) == (1, "labelled", {"noise": 0.24})

    reloaded.finish_cycle(CycleSummary(cycle=1, n_labels_ok=9, lowest_clusters=[{"energy": -4.3, "member": 3, "label": 0, "size": 5}]))
    reloaded.finish_cycle(CycleSummary(cycle=1, n_labels_ok=10))  # a re-run of the evaluation replaces the entry
    reloaded.stop("converged")
    final = ActiveState.load(tmp_path)
    assert final.last_finished_cycle == 1 and final.done(1, "evaluated") and final.stopped
    assert [c["n_labels_ok"] for c in final.cycles] == [10]

    cycles = read_cycles(tmp_path)
    assert cycles["stop_reason"] == "converged" and cycles["cycles"][0]["cycle"] == 1
    assert state.pool_path(0).name == "pool_000.npz" and state.pool_path(3).parent.name == "cycle_003"


def test_broken_checkpoints_fail_with_a_clear_message(tmp_path):
    state = ActiveState.load(tmp_path)
    state.save()
    with pytest.raises(CheckpointError, match="is missing although"):
        state.require(state.model_path(1), "model file")

    state.path.write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        ActiveState.load(tmp_path)

    state.path.write_text(json.dumps({"version": 99}))
    with pytest.raises(CheckpointError, match="another xtalforge version"):
        ActiveState.load(tmp_path)

    state.path.write_text(json.dumps({"version": 1, "phase": "dancing"}))
    with pytest.raises(CheckpointError, match="unknown phase"):
        ActiveState.load(tmp_path)

    state.path.write_text(json.dumps({"version": 1, "colour": "red"}))
    with pytest.raises(CheckpointError, match="not an active-learning checkpoint"):
        ActiveState.load(tmp_path)
