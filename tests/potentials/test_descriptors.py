"""Symmetry functions: input counts of seed 000, the moment expansion, neighbour lists."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.neighborlist import neighbor_list
from nnp_helpers import rattled, ternary_cell

from xtalforge.errors import XtalforgeError
from xtalforge.potentials import BPNN, SymmetryFunctions
from xtalforge.potentials.descriptors import neighbour_pairs
from xtalforge.structures.batch import Batch


@pytest.mark.parametrize("n_elements, expected", [(1, 26), (2, 70), (3, 132), (4, 212)])
def test_default_input_counts_match_seed_000(n_elements, expected):
    # seed 000: 8 radial + 18 angular per element pair -> 132 (ternary), 212 (quaternary)
    assert SymmetryFunctions().n_features(n_elements) == expected


def test_feature_vector_has_the_counted_length():
    atoms = ternary_cell()
    model = BPNN(["C", "Si", "Ge"])
    features = model.descriptor.features(model.graph(Batch.from_atoms([atoms])))
    assert features.shape == (len(atoms), 132)


@pytest.mark.parametrize("structure", ["si", "ternary"])
def test_moment_expansion_equals_explicit_triplet_sum(structure):
    atoms = rattled(bulk("Si", "diamond", a=5.431, cubic=True), 3) if structure == "si" else ternary_cell(1)
    elements = sorted(set(atoms.get_chemical_symbols()))
    model = BPNN(elements)
    graph = model.graph(Batch.from_atoms([atoms]))
    sf = model.descriptor
    moments = sf.features_from_moments(sf.moments(sf.pair_basis(graph.vec, graph.segments)))
    triplets = sf.triplet_features(graph, include_jk=False)
    assert torch.allclose(moments, triplets, rtol=1e-10, atol=1e-10)
    # G4 (with the r_jk terms) is a different, smaller function of the same triplets
    g4 = sf.triplet_features(graph, include_jk=True)
    n_radial = sf.n_radial * len(elements)
    assert torch.allclose(g4[:, :n_radial], moments[:, :n_radial])
    assert torch.all(g4[:, n_radial:] <= moments[:, n_radial:] + 1e-12)


def test_angular_sum_by_hand_for_a_trimer():
    # three atoms, open boundaries: check one G5 value against the formula directly
    atoms = Atoms("Si3", positions=[[0, 0, 0], [2.2, 0, 0], [0.4, 2.5, 0.3]], pbc=False)
    sf = SymmetryFunctions(radial_eta=[0.1], angular_eta=[0.05], zeta=[2], lambdas=[1], cutoff=6.0)
    features = sf.features(BPNN(["Si"], sf).graph(Batch.from_atoms([atoms])))
    p = atoms.positions
    rij, rik = p[1] - p[0], p[2] - p[0]
    a, b = np.linalg.norm(rij), np.linalg.norm(rik)
    fc = lambda r: 0.5 * (np.cos(np.pi * r / 6.0) + 1)
    cos = rij @ rik / (a * b)
    # ordered pairs (j, k) and (k, j): twice the single term; 2^(1-ζ) = 1/2
    expected = 2 * 0.5 * (1 + cos) ** 2 * np.exp(-0.05 * (a**2 + b**2)) * fc(a) * fc(b)
    assert features[0, 1].item() == pytest.approx(expected, rel=1e-12)
    expected_radial = np.exp(-0.1 * a**2) * fc(a) + np.exp(-0.1 * b**2) * fc(b)
    assert features[0, 0].item() == pytest.approx(expected_radial, rel=1e-12)


@pytest.mark.parametrize("case", ["tiny_cell", "skewed", "unwrapped", "open"])
def test_neighbour_list_matches_ase(case):
    rng = np.random.default_rng(7)
    if case == "tiny_cell":
        atoms = bulk("Si", "fcc", a=2.9)  # one atom, cell far smaller than the 6 Å cutoff
    else:
        atoms = bulk("Si", "diamond", a=5.431).repeat((1, 2, 1))
    if case in ("skewed", "unwrapped"):
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + 0.3 * rng.normal(size=(3, 3))), scale_atoms=True)
    atoms.positions += rng.normal(0, 0.1, atoms.positions.shape)
    if case == "unwrapped":
        atoms.positions += 25.0 * rng.normal(size=atoms.positions.shape)
    if case == "open":
        atoms.pbc = False
    i, j, d = neighbour_pairs(atoms.positions, atoms.cell[:], atoms.pbc, 6.0)
    ri, rj, rd = neighbor_list("ijD", atoms, 6.0)
    ours = sorted(zip(i, j, *np.round(d, 8).T))
    theirs = sorted(zip(ri, rj, *np.round(rd, 8).T))
    assert len(ours) == len(theirs) > 0
    assert ours == theirs
    assert np.all(np.diff(i) >= 0)


def test_unknown_element_is_a_one_line_error():
    model = BPNN(["Si"])
    with pytest.raises(XtalforgeError, match="not trained on element.*O"):
        model.graph(Batch.from_atoms([bulk("SiO", "rocksalt", a=4.0)]))


def test_features_are_continuous_when_a_neighbour_crosses_the_cutoff():
    sf = SymmetryFunctions()
    model = BPNN(["Si"], sf)

    def features(distance):
        atoms = Atoms("Si3", positions=[[0, 0, 0], [2.3, 0, 0], [0, distance, 0]], pbc=False)
        return sf.features(model.graph(Batch.from_atoms([atoms])))[0]

    inside, outside = features(6.0 - 1e-6), features(6.0 + 1e-6)
    assert torch.allclose(inside, outside, atol=1e-9)
