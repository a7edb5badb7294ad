"""Structure matching (targets) and de-duplication (rankings)."""

import numpy as np
import pytest
from ase.io import read

from xtalforge.similarity import Deduplicator, matches, unique


@pytest.fixture(scope="module")
def si(reference_dir):
    names = {"diamond": "Si_diamond_Fd-3m.cif", "lonsdaleite": "Si_lonsdaleite_P63mmc.cif",
             "beta_tin": "Si_beta-tin_I41amd.cif", "bc8": "Si_BC8_Ia-3.cif"}
    return {key: read(reference_dir / name) for key, name in names.items()}


def rattled(atoms, amplitude, seed, repeat=(1, 1, 1)):
    copy = atoms.repeat(repeat)
    copy.rattle(amplitude, rng=np.random.default_rng(seed))
    return copy


def test_target_matching(si, reference_dir):
    diamond = si["diamond"]
    assert matches(rattled(diamond, 0.01, 0, (2, 1, 1)), diamond)
    assert matches(diamond.repeat((2, 1, 1)), diamond)  # Si16 against the 8-atom target
    strained = diamond.copy()
    strained.set_cell(diamond.cell * 1.02, scale_atoms=True)  # another oracle's lattice constant
    assert matches(strained, diamond)
    assert not matches(strained, diamond, scale=False, ltol=0.01, stol=0.01)
    assert not matches(si["lonsdaleite"], diamond)
    assert not matches(si["beta_tin"], diamond)
    rocksalt = read(reference_dir / "NaCl_rocksalt_Fm-3m.cif")
    assert not matches(read(reference_dir / "NaCl_CsCl-type_Pm-3m.cif"), rocksalt)
    assert not matches(diamond, rocksalt)  # different composition


def test_deduplicator_collapses_rattled_copies_and_keeps_polymorphs(si):
    dedupe = Deduplicator()
    assert dedupe.add(si["diamond"], -4.336, "d") is None
    assert dedupe.add(rattled(si["diamond"], 0.01, 1, (2, 1, 1)), -4.335, "d2") == "d"
    assert dedupe.add(si["lonsdaleite"], -4.334, "l") is None  # 2 meV/atom apart, still kept
    assert dedupe.add(si["beta_tin"], -4.0, "b") is None
    assert dedupe.add(rattled(si["lonsdaleite"], 0.01, 2), -4.3345, "l2") == "l"
    assert dedupe.keys == ["d", "l", "b"]
    assert dedupe.duplicates == {"d": ["d2"], "l": ["l2"], "b": []}
    assert len(dedupe) == 3
    assert dedupe.find(si["diamond"].repeat(2), -4.336) == "d"
    assert len(dedupe) == 3  # find stores nothing


def test_energy_tolerance_and_rdf_prefilter_skip_the_matcher(si):
    dedupe = Deduplicator(energy_tol=0.005)
    dedupe.add(si["diamond"], -4.3, "d")
    # Same geometry but 50 meV/atom apart: a different minimum of a different oracle state.
    assert dedupe.add(si["diamond"].repeat((1, 2, 1)), -4.25, "far") is None
    assert dedupe.n_matcher_calls == 0
    # Energies unknown: only the RDF pre-filter rules beta-tin out, again without a fit.
    before = dedupe.n_matcher_calls
    assert dedupe.add(si["beta_tin"], None, "b") is None
    assert dedupe.n_matcher_calls == before
    # Without the pre-filter the matcher has to decide, with the same answer.
    plain = Deduplicator(energy_tol=None, rdf_prefilter=None)
    plain.add(si["diamond"], None, "d")
    assert plain.add(si["beta_tin"], None, "b") is None
    assert plain.n_matcher_calls == 1


def test_unique_sorts_by_energy_and_keeps_the_lowest_of_each_group(si):
    entries = [
        ("beta_tin", si["beta_tin"], -4.0),
        ("diamond_hi", rattled(si["diamond"], 0.01, 3), -4.334),
        ("bc8", si["bc8"], -4.1),
        ("diamond_lo", si["diamond"], -4.336),
        ("unknown", si["lonsdaleite"], None),
    ]
    kept = unique(entries)
    assert [key for key, _, _ in kept] == ["diamond_lo", "bc8", "beta_tin", "unknown"]
