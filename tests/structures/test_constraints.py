import itertools

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.data import atomic_numbers, covalent_radii
from ase.io import read

from xtalforge.config import StructuresConfig
from xtalforge.errors import ConstraintError
from xtalforge.structures import Composition, Constraints, atomic_volume


def brute_force_min_distances(atoms: Atoms, cutoff: float) -> np.ndarray:
    """(N, N) shortest distance over all periodic images within reach of ``cutoff``, own images included."""
    cell = atoms.cell.array
    spacings = atoms.get_volume() / np.linalg.norm(
        np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1
    )
    reach = np.ceil(cutoff / spacings).astype(int) + 1
    shifts = (
        np.array(list(itertools.product(*[range(-r, r + 1) for r in reach]))) @ cell
    )
    delta = (
        atoms.positions[None, :, None, :]
        - atoms.positions[:, None, None, :]
        + shifts[None, None, :, :]
    )
    distance = np.linalg.norm(delta, axis=-1)
    distance[distance < 1e-12] = np.inf  # the atom itself
    return distance.min(axis=-1)


def test_default_distance_is_scaled_covalent_sum_and_overrides_are_symmetric():
    c = Constraints(
        min_distances={"Na-Cl": 1.5, ("Si", "Si"): 1.6}, min_distance_scale=0.7
    )
    assert c.min_distance("Cl", "Na") == c.min_distance("Na", "Cl") == 1.5
    assert c.min_distance("Si", "Si") == 1.6
    expected = 0.7 * (
        covalent_radii[atomic_numbers["Na"]] + covalent_radii[atomic_numbers["Na"]]
    )
    assert c.min_distance("Na", "Na") == pytest.approx(expected)


def test_min_distance_matrix_matches_pairwise_lookup():
    c = Constraints(min_distances={"Mg-O": 1.9})
    comp = Composition.parse("Mg2SiO4")
    matrix = c.min_distance_matrix(comp.numbers)
    expected = [[c.min_distance(a, b) for b in comp.symbols] for a in comp.symbols]
    np.testing.assert_allclose(matrix, expected)
    np.testing.assert_allclose(matrix, matrix.T)


def test_default_volume_range_is_scaled_mean_atomic_volume():
    c = Constraints(volume_scale_range=(0.5, 2.0))
    comp = Composition.parse("Al2O3", 2)
    mean = np.mean([atomic_volume(z) for z in comp.numbers])
    assert c.volume_range(comp.numbers) == pytest.approx((0.5 * mean, 2.0 * mean))


def test_default_constraints_admit_known_crystals(reference_dir):
    """Every reference polymorph, high-pressure beta-tin included, meets the default constraints."""
    for path in sorted(reference_dir.glob("*.cif")):
        atoms = read(path)
        assert Constraints().violations(atoms) == [], path.name


def test_distance_violations_match_brute_force_on_skewed_cells():
    rng = np.random.default_rng(0)
    c = Constraints(
        min_distances={"Si-Si": 2.2, "Si-O": 1.7, "O-O": 2.0},
        lattice_min=0.1,
        lattice_max=50,
        volume_per_atom=(0.01, 1e4),
    )
    seen = set()
    for _ in range(30):
        cell = np.diag(rng.uniform(2.5, 5.0, 3)) + rng.uniform(
            -1.5, 1.5, (3, 3)
        )  # some nearly flat
        atoms = Atoms("Si2O3", scaled_positions=rng.random((5, 3)), cell=cell, pbc=True)
        broken = brute_force_min_distances(atoms, 2.2) < c.min_distance_matrix(
            atoms.numbers
        )
        symbols = np.array(atoms.get_chemical_symbols())
        first, second = np.nonzero(broken)
        expected = {frozenset(pair) for pair in zip(symbols[first], symbols[second])}
        reported = {
            frozenset(problem.split()[0].split("-")) for problem in c.violations(atoms)
        }
        assert reported == expected
        seen.add(len(expected))
    assert len(seen) > 1  # the sample holds both valid and broken structures


def test_periodic_image_of_the_atom_itself_counts():
    c = Constraints(
        min_distances={"Si-Si": 1.6}, lattice_min=1.0, volume_per_atom=(1.0, 100.0)
    )
    one_atom = Atoms("Si", positions=[[0, 0, 0]], cell=[1.5, 5.0, 5.0], pbc=True)
    (problem,) = c.violations(one_atom)
    assert "Si-Si distance 1.500" in problem


def test_violations_name_each_broken_constraint():
    c = Constraints(
        min_distances={"Si-Si": 1.6},
        lattice_min=3.0,
        lattice_max=15.0,
        volume_per_atom=(15.0, 30.0),
    )
    diamond = bulk("Si", "diamond", a=5.43, cubic=True)
    assert c.is_valid(diamond)
    squeezed = diamond.copy()
    squeezed.set_cell(diamond.cell * 0.55, scale_atoms=True)  # a = 2.99 Å, d = 1.29 Å
    problems = c.violations(squeezed)
    assert any("shorter than lattice_min" in p for p in problems)
    assert any("volume" in p for p in problems)
    assert any(p.startswith("Si-Si distance") for p in problems)
    moved = diamond.copy()
    moved.positions[1] = moved.positions[0] + [1.0, 0.5, 0.0]
    assert [p for p in c.violations(moved) if p.startswith("Si-Si")]


def test_violations_invariant_under_translation_and_permutation():
    c = Constraints()
    rng = np.random.default_rng(1)
    atoms = Atoms(
        "Na4Cl4", scaled_positions=rng.random((8, 3)), cell=np.eye(3) * 6.0, pbc=True
    )
    moved = atoms[rng.permutation(8)]
    moved.translate([1.3, -0.7, 2.2])
    moved.wrap()
    assert sorted(c.violations(atoms)) == sorted(c.violations(moved))


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"lattice_min": 10.0, "lattice_max": 5.0}, "larger than lattice_max"),
        ({"lattice_min": -1.0}, "lattice_min must be a positive"),
        ({"min_distances": {"Si-Si": -1.6}}, "min_distances[Si-Si]"),
        ({"min_distances": {"Si-Xx": 1.6}}, "unknown element"),
        ({"min_distances": {"SiSi": 1.6}}, "not a pair"),
        ({"volume_per_atom": (30.0, 10.0)}, "above its high end"),
        ({"volume_per_atom": (10.0,)}, "two numbers"),
        ({"min_distance_scale": float("nan")}, "min_distance_scale"),
    ],
)
def test_invalid_constraints_raise_one_line(kwargs, fragment):
    with pytest.raises(ConstraintError) as info:
        Constraints(**kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (
            {"min_distances": {"Si-Si": 5.0}, "volume_per_atom": (4.0, 5.0)},
            "need at least",
        ),
        (
            {"min_distances": {"Si-Si": 3.0}, "lattice_min": 1.0, "lattice_max": 2.5},
            "periodic image",
        ),
        ({"volume_per_atom": (40.0, 50.0), "lattice_max": 6.0}, "raise lattice_max"),
    ],
)
def test_impossible_constraint_sets_are_refused(kwargs, fragment):
    with pytest.raises(ConstraintError) as info:
        Constraints(**kwargs).resolved("Si8")
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_from_config_resolves_every_pair_and_the_volume_range():
    config = StructuresConfig(
        min_distances={"Na-Cl": 1.5, "Na-Na": 2.0},
        lattice_min=3.0,
        volume_scale_range=[0.7, 1.4],
    )
    c = Constraints.from_config(Composition.parse("Na4Cl4"), config)
    assert c.min_distances[("Cl", "Na")] == 1.5 and c.min_distances[("Na", "Na")] == 2.0
    assert c.min_distances[("Cl", "Cl")] == pytest.approx(
        0.7 * 2 * covalent_radii[atomic_numbers["Cl"]]
    )
    mean = (atomic_volume(11) + atomic_volume(17)) / 2
    assert c.volume_per_atom == pytest.approx((0.7 * mean, 1.4 * mean))
    assert c.lattice_min == 3.0 and c.lattice_max == config.lattice_max
