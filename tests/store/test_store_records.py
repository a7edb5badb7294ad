"""RunStore: typed round trip, queries, transactional writes, corrupt files."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

from xtalforge.errors import CheckpointError
from xtalforge.store import RunStore, StructureRecord


def make_record(candidate, *, status="ok", stage="search", energy=-4.3, **fields):
    initial = bulk("Si", "diamond", a=5.6, cubic=True)
    initial.rattle(0.1, rng=np.random.default_rng(candidate))
    relaxed = bulk("Si", "diamond", a=5.43, cubic=True) if status == "ok" else None
    values = {
        "candidate": candidate, "status": status, "method": "random", "stage": stage,
        "energy_per_atom": energy if status == "ok" else None, "oracle_calls": 10 + candidate,
        "oracle_calls_total": 100 * (candidate + 1), "initial": initial, "relaxed": relaxed,
    }
    values.update(fields)
    return StructureRecord(**values)


def test_round_trip_keeps_every_field(tmp_path):
    store = RunStore(tmp_path)
    relaxed = bulk("Si", "diamond", a=5.43, cubic=True)
    forces = np.random.default_rng(0).normal(size=(8, 3))
    relaxed.calc = SinglePointCalculator(relaxed, energy=-34.7, forces=forces)
    record = make_record(
        7, generation=3, enthalpy_per_atom=-4.2, spacegroup_number=227, spacegroup_symbol="Fd-3m",
        relax_status="converged", seed=42, parents=[1, 5], operator="symmetric:sg227",
        relaxed=relaxed, extra={"matches_target": True, "fmax": np.float32(0.01), "path": [1.0, 2.0]},
    )
    row_id = store.add(record)
    assert record.row_id == row_id
    [back] = store.records()
    for name in ("candidate", "status", "method", "stage", "generation", "energy_per_atom", "enthalpy_per_atom",
                 "oracle_calls", "oracle_calls_total", "spacegroup_number", "spacegroup_symbol", "relax_status",
                 "error", "seed", "parents", "operator"):
        assert getattr(back, name) == getattr(record, name), name
    assert isinstance(back.candidate, int) and isinstance(back.energy_per_atom, float)
    assert back.extra == {"matches_target": True, "fmax": pytest.approx(0.01), "path": [1.0, 2.0]}
    np.testing.assert_allclose(back.initial.positions, record.initial.positions)
    np.testing.assert_allclose(back.initial.cell, record.initial.cell)
    np.testing.assert_allclose(back.relaxed.positions, relaxed.positions)
    # Oracle labels on the relaxed geometry survive (training sets are built from them).
    assert back.relaxed.get_potential_energy() == pytest.approx(-34.7)
    np.testing.assert_allclose(back.relaxed.get_forces(), forces)
    assert back.ranking_energy == -4.2  # enthalpy when present


def test_failed_record_without_relaxed_geometry(tmp_path):
    store = RunStore(tmp_path)
    store.add(make_record(0, status="failed", relax_status="overlap", error="atoms 0 and 3 at 0.2 Å"))
    [back] = store.records()
    assert back.relaxed is None and back.atoms is back.initial and len(back.initial) == 8
    assert back.energy_per_atom is None and back.error == "atoms 0 and 3 at 0.2 Å"


def test_stale_calculator_results_are_not_stored(tmp_path):
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.calc = SinglePointCalculator(atoms, energy=-34.7)
    atoms.positions[0] += 0.3  # moved after the single point: the energy is not for this geometry
    store = RunStore(tmp_path)
    store.add(make_record(0, relaxed=atoms))
    assert store.records()[0].relaxed.calc is None


def test_queries(tmp_path):
    store = RunStore(tmp_path)
    assert store.done_candidates() == set() and store.best() == [] and store.count() == 0
    store.add(make_record(0, energy=-4.1))
    store.add(make_record(1, status="failed"))
    store.add(make_record(2, energy=-4.3, enthalpy_per_atom=-4.0))
    store.add(make_record(3, energy=-4.2))
    store.add(make_record(2, stage="validation", energy=-4.25))
    store.add(make_record(10, stage="label", energy=-9.0, method="active", generation=1))
    store.add(make_record(4, energy=float("nan")))  # unknown energy reads back as None
    assert store.count() == len(store) == 7
    assert store.count(status="failed") == 1
    assert store.count(stage="search") == 5
    assert store.done_candidates() == {0, 1, 2, 3, 4}
    assert store.done_candidates(stage="validation") == {2}
    assert [r.candidate for r in store.records(method="active", generation=1)] == [10]
    assert [r.candidate for r in store.records(status="ok", stage="search")] == [0, 2, 3, 4]
    assert store.records(stage="search")[-1].energy_per_atom is None
    # Ranked by enthalpy (candidate 2: -4.0) else energy; label single points are not minima.
    assert [(r.candidate, r.stage) for r in store.best(3)] == [(2, "validation"), (3, "search"), (0, "search")]
    assert store.best(1, stages=None)[0].stage == "label"
    assert store.oracle_calls_spent() == sum(10 + c for c in (0, 1, 2, 3, 2, 10, 4))
    # A second store object on the same directory sees the same rows (resume).
    assert RunStore(tmp_path).done_candidates() == {0, 1, 2, 3, 4}


def test_invalid_records_are_rejected_before_writing(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(ValueError, match="status"):
        store.add(make_record(0, status="done"))
    with pytest.raises(ValueError, match="extra"):
        store.add(make_record(0, extra={"calc": object()}))
    with pytest.raises(ValueError, match="integer"):
        store.add(make_record(0, oracle_calls=2.5))
    assert store.count() == 0


def test_missing_and_corrupt_databases_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no structures.db"):
        RunStore(tmp_path / "nothing", create=False)
    (tmp_path / "structures.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CheckpointError) as info:
        RunStore(tmp_path)
    message = str(info.value)
    assert "structures.db" in message and "\n" not in message and "--out" in message


WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from ase.build import bulk
    from xtalforge.store import RunStore, StructureRecord

    store = RunStore(sys.argv[1])
    rng = np.random.default_rng(0)
    for i in range(100000):
        atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(2)
        atoms.rattle(0.05, rng=rng)
        store.add(StructureRecord(
            candidate=i, status="ok", method="random", energy_per_atom=-4.3 + 1e-3 * i,
            oracle_calls=1, oracle_calls_total=i + 1, initial=atoms, relaxed=atoms,
            parents=list(range(50)), extra={"trajectory": rng.normal(size=(40, 64, 3))},
        ))
        print(i, flush=True)
    """
)


def test_killed_writer_leaves_only_complete_rows(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    run_dir = tmp_path / "run"
    written = 0
    with subprocess.Popen([sys.executable, str(script), str(run_dir)], stdout=subprocess.PIPE, text=True) as proc:
        try:
            deadline = time.monotonic() + 60
            while written < 15 and time.monotonic() < deadline:  # let it get well into its writes
                line = proc.stdout.readline()
                if not line:
                    break
                written = int(line) + 1
            os.kill(proc.pid, signal.SIGKILL)  # most likely inside the next write's transaction
        finally:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert written >= 15, "writer did not start"
    store = RunStore(run_dir)
    records = store.records()
    assert len(records) >= written
    assert [r.candidate for r in records] == list(range(len(records)))  # no gaps, no half rows
    for record in records:
        assert len(record.relaxed) == 64 and len(record.initial) == 64
        assert record.parents == list(range(50))
        assert record.extra["trajectory"].shape == (40, 64, 3)
        assert record.energy_per_atom == pytest.approx(-4.3 + 1e-3 * record.candidate)
    assert store.done_candidates() == set(range(len(records)))
    # The resumed run writes on where the killed one stopped.
    store.add(StructureRecord(candidate=len(records), status="failed", method="random", error="after resume"))
    assert store.count() == len(records) + 1


@pytest.mark.timeout(60)
def test_a_lock_file_left_by_a_killed_writer_does_not_block_the_resumed_run(tmp_path):
    store = RunStore(tmp_path)
    store.add(StructureRecord(candidate=0, status="failed", method="random", error="before the kill"))
    # What ASE's lock leaves behind when its holder is killed inside a write.
    (tmp_path / "structures.db.lock").write_text("")
    resumed = RunStore(tmp_path)
    resumed.add(StructureRecord(candidate=1, status="failed", method="random", error="after resume"))
    assert resumed.done_candidates() == {0, 1}
