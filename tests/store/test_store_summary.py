"""summary.json contract: fields, types, ranking, unique structures, CIFs."""

import json

import numpy as np
import pytest
from ase.io import read

from xtalforge.similarity import matches
from xtalforge.store import RunStore, StructureRecord, build_summary, write_summary

# (name, CIF, energy eV/atom) ~ SevenNet-0 energies of the reference README
POLYMORPHS = [
    ("diamond", "Si_diamond_Fd-3m.cif", -5.4030),
    ("lonsdaleite", "Si_lonsdaleite_P63mmc.cif", -5.3911),
    ("bc8", "Si_BC8_Ia-3.cif", -5.2006),
    ("beta_tin", "Si_beta-tin_I41amd.cif", -5.1297),
]


@pytest.fixture
def store(tmp_path, reference_dir):
    """A run of six candidates: four polymorphs, a duplicate of diamond, one failure."""
    store = RunStore(tmp_path)
    rng = np.random.default_rng(0)
    calls = 0
    order = [3, 2, 0, 1]  # found in this order: beta-tin first, diamond third
    for candidate, k in enumerate(order):
        name, cif, energy = POLYMORPHS[k]
        atoms = read(reference_dir / cif)
        calls += 50
        store.add(StructureRecord(candidate=candidate, status="ok", method="random", energy_per_atom=energy,
                                  oracle_calls=50, oracle_calls_total=calls, initial=atoms, relaxed=atoms,
                                  extra={"name": name}))
    duplicate = read(reference_dir / "Si_diamond_Fd-3m.cif").repeat((2, 1, 1))
    duplicate.rattle(0.01, rng=rng)
    calls += 70
    store.add(StructureRecord(candidate=4, status="ok", method="random", energy_per_atom=-5.4028,
                              oracle_calls=70, oracle_calls_total=calls, initial=duplicate, relaxed=duplicate))
    calls += 9
    store.add(StructureRecord(candidate=5, status="failed", method="random", relax_status="overlap",
                              error="atoms 1 and 4 closer than 1.1 Å", oracle_calls=9, oracle_calls_total=calls,
                              initial=duplicate))
    return store


def summarise(store, **overrides):
    kwargs = {"composition": "Si8", "method": "random", "oracle": "sw", "oracle_calls": 339, "wall_time_s": 12.5,
              "n_candidates": 6, "target_found": True, "oracle_calls_to_target": 150}
    kwargs.update(overrides)
    return build_summary(store, **kwargs)


def test_contract_fields_and_types(store):
    summary = summarise(store)
    types = {"composition": str, "method": str, "oracle": str, "oracle_calls": int, "wall_time_s": float,
             "n_candidates": int, "best": dict, "top": list, "target_found": bool, "oracle_calls_to_target": int}
    for key, kind in types.items():
        assert isinstance(summary[key], kind), key
    for entry in summary["top"]:
        assert isinstance(entry["energy_per_atom"], float)
        assert isinstance(entry["spacegroup"], str)
        assert isinstance(entry["cif"], str)
    json.loads(json.dumps(summary, allow_nan=False))  # plain JSON
    assert summarise(store, target_found=None, oracle_calls_to_target=None)["target_found"] is None


def test_ranking_is_unique_sorted_and_excludes_failures(store, reference_dir, tmp_path):
    summary = summarise(store)
    top = summary["top"]
    assert [e["spacegroup_number"] for e in top] == [227, 194, 206, 141]
    assert summary["best"] == top[0]
    assert top[0]["candidate"] == 2 and top[0]["n_duplicates"] == 1  # the rattled Si16 copy
    assert top[0]["oracle_calls_total"] == 150
    assert [e["rank"] for e in top] == [1, 2, 3, 4]
    assert top[1]["delta_e_mev"] == pytest.approx(11.9)
    assert 5 not in {e["candidate"] for e in top}
    assert summary["n_failed"] == 1 and summary["failures"] == {"overlap": 1}
    assert summary["n_structures"] == 6
    # Each CIF exists, relative to the run directory, and holds its structure.
    for entry, (_, cif, _) in zip(top, [POLYMORPHS[i] for i in (0, 1, 2, 3)]):
        assert not entry["cif"].startswith("/")
        assert matches(read(tmp_path / entry["cif"]), read(reference_dir / cif))
    # A short list stops early but still counts the duplicates of what it lists.
    short = summarise(store, top_k=1)["top"]
    assert len(short) == 1 and short[0]["n_duplicates"] == 1


def test_enthalpy_ranks_and_validation_replaces_search(store, reference_dir):
    bc8 = read(reference_dir / "Si_BC8_Ia-3.cif")
    # A validation re-relaxation of candidate 1 (BC8) that now comes out lowest in enthalpy.
    store.add(StructureRecord(candidate=1, status="ok", method="random", stage="validation",
                              energy_per_atom=-5.2, enthalpy_per_atom=-5.5, initial=bc8, relaxed=bc8))
    summary = summarise(store)
    assert summary["best"]["spacegroup_number"] == 206
    assert summary["best"]["stage"] == "validation" and summary["best"]["cif"] == "cifs/validation_000001.cif"
    assert [e["candidate"] for e in summary["top"]].count(1) == 1


def test_empty_and_all_failed_runs(tmp_path):
    store = RunStore(tmp_path)
    summary = summarise(store, n_candidates=0, oracle_calls=0)
    assert summary["best"] is None and summary["top"] == []
    store.add(StructureRecord(candidate=0, status="failed", method="random", error="NaN energy: oracle diverged"))
    summary = summarise(store)
    assert summary["best"] is None and summary["failures"] == {"NaN energy": 1}
    write_summary(tmp_path, summary)
