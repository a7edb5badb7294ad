import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import spglib
from ase.neighborlist import neighbor_list

from xtalforge.errors import ConfigError, ConstraintError
from xtalforge.structures import (
    Composition,
    Constraints,
    PyxtalTimeout,
    candidate_rng,
    compatible_spacegroups,
    generate_many,
    generate_structure,
)
from xtalforge.structures.generate import (
    _primitive_cell,
    lattice_points,
    time_limit,
    wyckoff_compatible,
)

TABLE_I = {
    "Si-Si": 1.6,
    "Na-Na": 2.0,
    "Cl-Cl": 2.0,
    "Na-Cl": 1.5,
    "Al-Al": 2.0,
    "O-O": 2.0,
    "Al-O": 1.5,
}
COMPOSITIONS = ["Si8", "Na4Cl4", "Al4O6", "Mg2SiO4"]


@pytest.fixture(scope="module")
def constraints():
    return Constraints(min_distances=TABLE_I, lattice_min=2.0, lattice_max=15.0)


def symmetry_operations(atoms) -> int:
    cell = (atoms.cell.array, atoms.get_scaled_positions(), atoms.numbers)
    return len(spglib.get_symmetry_dataset(cell, symprec=1e-3).rotations)


def general_multiplicity(spacegroup: int) -> int:
    from pyxtal.symmetry import Group

    return Group(spacegroup)[0].multiplicity


@pytest.mark.parametrize("mode", ["symmetric", "random"])
@pytest.mark.parametrize("formula", COMPOSITIONS)
def test_generated_structures_satisfy_every_constraint(formula, mode, constraints):
    composition = Composition.parse(formula)
    resolved = constraints.resolved(composition)
    for seed in range(3):
        atoms = generate_structure(
            composition, constraints, np.random.default_rng(seed), mode=mode
        )
        assert resolved.violations(atoms) == []
        assert atoms.get_chemical_symbols() == composition.symbols
        assert atoms.info["generator"] == (
            "pyxtal" if mode == "symmetric" else "random"
        )
        if mode == "random":
            assert atoms.info["spacegroup"] == 1
            assert np.all(
                (atoms.cell.angles() >= 60 - 1e-9) & (atoms.cell.angles() <= 120 + 1e-9)
            )
        else:
            # The structure really has the symmetry of the group it was built in.
            assert symmetry_operations(atoms) >= general_multiplicity(
                atoms.info["spacegroup"]
            )


@pytest.mark.parametrize("mode", ["symmetric", "random"])
def test_same_seed_same_structure(mode, constraints):
    first, again, other = (
        generate_structure(
            "Na4Cl4", constraints, np.random.default_rng(seed), mode=mode
        )
        for seed in (7, 7, 8)
    )
    np.testing.assert_array_equal(first.positions, again.positions)
    np.testing.assert_array_equal(first.cell.array, again.cell.array)
    assert first.info == again.info
    assert not np.allclose(first.cell.array, other.cell.array)


def test_generate_many_uses_one_generator_per_candidate(constraints):
    batch = generate_many("Si8", constraints, n=3, seed=11, progress=False)
    resumed = generate_many("Si8", constraints, n=2, seed=11, start=1, progress=False)
    alone = generate_structure("Si8", constraints, candidate_rng(11, 2))
    np.testing.assert_array_equal(batch[2].positions, alone.positions)
    for full, part in zip(batch[1:], resumed):
        np.testing.assert_array_equal(full.positions, part.positions)
        np.testing.assert_array_equal(full.cell.array, part.cell.array)


@pytest.mark.parametrize("mode", ["symmetric", "random"])
def test_per_pair_override_is_respected(mode):
    # Na-Cl far above its covalent default (1.88 Å), Cl-Cl far below (1.43 Å).
    constraints = Constraints(
        min_distances={"Na-Cl": 2.8, "Cl-Cl": 1.0}, volume_per_atom=(25.0, 40.0)
    )
    closest_nacl = []
    for seed in range(3):
        atoms = generate_structure(
            "Na4Cl4", constraints, np.random.default_rng(seed), mode=mode
        )
        first, second, distance = neighbor_list("ijd", atoms, 6.0)
        unlike = atoms.numbers[first] != atoms.numbers[second]
        closest_nacl.append(distance[unlike].min())
    assert min(closest_nacl) >= 2.8 - 1e-8


def test_diamond_is_the_only_si8_structure_in_fd3m(constraints):
    """Si8 in Fd-3m must use Wyckoff 8a: every atom has 4 equidistant neighbours."""
    atoms = generate_structure(
        "Si8", constraints, np.random.default_rng(0), spacegroups=[227]
    )
    assert atoms.info["spacegroup"] == 227
    first, distance = neighbor_list(
        "id", atoms, 1.01 * neighbor_list("d", atoms, 8.0).min()
    )
    assert np.all(np.bincount(first, minlength=8) == 4)
    np.testing.assert_allclose(distance, distance[0])


def test_impossible_constraints_fail_fast():
    start = time.perf_counter()
    with pytest.raises(ConstraintError, match="need at least"):
        generate_structure(
            "Si8",
            Constraints(min_distances={"Si-Si": 5.0}, volume_per_atom=(4.0, 5.0)),
            np.random.default_rng(0),
        )
    with pytest.raises(ConstraintError, match="lattice_min"):
        Constraints(lattice_min=6.0, lattice_max=4.0)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("mode", ["symmetric", "random"])
def test_unreachable_constraints_end_after_max_attempts(mode):
    # Passes the necessary checks but needs a perfect close packing (fraction 0.74) of 8 atoms.
    constraints = Constraints(
        min_distances={"Si-Si": 2.3},
        lattice_min=4.0,
        lattice_max=4.2,
        volume_per_atom=(8.0, 8.7),
    )
    start = time.perf_counter()
    with pytest.raises(ConstraintError, match="in 5 attempts") as info:
        generate_structure(
            "Si8",
            constraints,
            np.random.default_rng(0),
            mode=mode,
            max_attempts=5,
            pyxtal_timeout_s=0.5,
        )
    assert time.perf_counter() - start < 5 * 0.5 + 5.0
    assert "\n" not in str(info.value)


def _first_call_hangs(monkeypatch):
    """Make the first PyXtal call spin forever (PyXtal's known failure mode); record the groups asked for."""
    import pyxtal

    original = pyxtal.pyxtal.from_random
    groups = []

    def from_random(self, dim, group, *args, **kwargs):
        groups.append(group.number)
        while len(groups) == 1:
            time.sleep(0.01)
        return original(self, dim, group, *args, **kwargs)

    monkeypatch.setattr(pyxtal.pyxtal, "from_random", from_random)
    return groups


def _generate_with_hang(constraints):
    start = time.perf_counter()
    atoms = generate_structure(
        "Si8",
        constraints,
        np.random.default_rng(3),
        spacegroups=[221, 225, 227, 229],
        pyxtal_timeout_s=0.3,
    )
    return atoms, time.perf_counter() - start


def test_pyxtal_time_out_moves_to_another_space_group(monkeypatch, constraints):
    groups = _first_call_hangs(monkeypatch)
    atoms, elapsed = _generate_with_hang(constraints)
    assert groups[0] not in groups[1:] and atoms.info["spacegroup"] != groups[0]
    assert elapsed < 5.0


def test_pyxtal_time_out_works_off_the_main_thread(monkeypatch, constraints):
    groups = _first_call_hangs(monkeypatch)
    with ThreadPoolExecutor(1) as pool:
        atoms, elapsed = pool.submit(_generate_with_hang, constraints).result(
            timeout=60
        )
    assert groups[0] not in groups[1:] and atoms.info["spacegroup"] != groups[0]
    assert elapsed < 5.0


def test_every_space_group_timing_out_is_an_error(monkeypatch, constraints):
    import pyxtal

    def hang(self, *args, **kwargs):
        while True:
            time.sleep(0.01)

    monkeypatch.setattr(pyxtal.pyxtal, "from_random", hang)
    with pytest.raises(ConstraintError, match="every allowed space group"):
        generate_structure(
            "Si8",
            constraints,
            np.random.default_rng(0),
            spacegroups=[225, 227],
            pyxtal_timeout_s=0.1,
        )


@pytest.mark.parametrize("use_alarm", [True, False])
def test_time_limit_interrupts_and_leaves_nothing_behind(use_alarm):
    # pytest-timeout arms SIGALRM; pause it so that the main-thread alarm path is the one exercised.
    paused = signal.setitimer(signal.ITIMER_REAL, 0)[0] if use_alarm else 0.0
    try:
        with pytest.raises(PyxtalTimeout), time_limit(0.05):
            while True:
                time.sleep(0.005)
        with time_limit(0.05):
            pass
        time.sleep(0.1)  # a stale timer would raise here
    finally:
        if paused:
            signal.setitimer(signal.ITIMER_REAL, paused)


def test_compatible_spacegroups_of_si8():
    groups = compatible_spacegroups("Si8")
    assert {1, 2, 225, 227}.issubset(groups)
    # Ia-3d (smallest orbit 16), Fd-3c (32), I-43d (12, 12, 16) cannot hold 8 atoms.
    assert not {220, 228, 230} & set(groups)


@pytest.mark.parametrize("counts", [(8,), (7,), (4, 6), (2, 1, 4), (6, 6)])
def test_compatibility_agrees_with_pyxtals_exhaustive_check(counts):
    from pyxtal.symmetry import Group

    for spacegroup in range(1, 231, 3):
        assert (
            wyckoff_compatible(spacegroup, counts)[0]
            == Group(spacegroup).check_compatible(list(counts))[0]
        )


def test_compatibility_of_large_compositions_is_fast():
    compatible_spacegroups("Si8")  # Wyckoff tables loaded
    start = time.perf_counter()
    large = compatible_spacegroups(
        Composition.parse("Mg2SiO4", formula_units=28)
    )  # 196 atoms
    prime = compatible_spacegroups("Si199")
    assert time.perf_counter() - start < 5.0
    assert 62 in large  # forsterite's Pnma
    assert 1 in prime and 227 not in prime


def test_two_hundred_atoms_random():
    constraints = Constraints(lattice_max=30.0)
    atoms = generate_structure(
        "Si200", constraints, np.random.default_rng(0), mode="random"
    )
    assert len(atoms) == 200 and constraints.is_valid(atoms)


def test_compatible_spacegroups_can_probe_generation(monkeypatch):
    """With max_tries, groups where PyXtal never builds a structure are dropped."""
    import pyxtal

    original = pyxtal.pyxtal.from_random

    def only_diamond_builds(self, dim, group, *args, **kwargs):
        if group.number != 227:
            raise RuntimeError("long time to generate structure, check inputs")
        return original(self, dim, group, *args, **kwargs)

    monkeypatch.setattr(pyxtal.pyxtal, "from_random", only_diamond_builds)
    assert compatible_spacegroups("Si8", max_tries=2) == [227]
    assert (
        len(compatible_spacegroups("Si8")) > 200
    )  # the counting check alone is unaffected


def test_bad_arguments(constraints):
    rng = np.random.default_rng(0)
    with pytest.raises(ConstraintError, match="no Wyckoff positions"):
        generate_structure("Si8", constraints, rng, spacegroups=[230])
    with pytest.raises(ConstraintError, match="1-230"):
        generate_structure("Si8", constraints, rng, spacegroups=[231])
    with pytest.raises(ConfigError, match="symmetric"):
        generate_structure("Si8", constraints, rng, mode="genetic")


@pytest.mark.parametrize(
    "formula, spacegroup",
    [("Al4O6", 167), ("Al4O6", 12), ("Al4O6", 38), ("Al4O6", 229), ("Si16", 227), ("Na4Cl4", 216)],
)  # centrings R, C, A, I, F, F
def test_primitive_cells_keep_the_atom_count_and_the_space_group(formula, spacegroup, constraints):
    atoms = generate_structure(formula, constraints, np.random.default_rng(3), spacegroups=[spacegroup], cell="primitive")
    counts = dict(Composition.parse(formula).counts)
    assert {s: atoms.get_chemical_symbols().count(s) for s in counts} == counts and len(atoms) == sum(counts.values())
    assert not constraints.resolved(Composition.parse(formula)).violations(atoms)
    # the primitive cell keeps every operation of the group (a random structure may have more)
    assert symmetry_operations(atoms) >= general_multiplicity(spacegroup) // lattice_points(spacegroup)


def test_the_primitive_cell_repeats_into_the_conventional_one():
    from pyxtal import pyxtal

    crystal = pyxtal()
    crystal.from_random(3, 167, ["Al", "O"], [12, 18], random_state=np.random.default_rng(1))
    conventional = crystal.to_ase(resort=False)
    primitive = _primitive_cell(conventional, 167)
    assert len(primitive) == 10 and primitive.get_volume() == pytest.approx(conventional.get_volume() / 3)
    # the same crystal (Niggli reduction may rotate the cell, so compare as structures)
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.io.ase import AseAtomsAdaptor

    to_structure = AseAtomsAdaptor.get_structure
    assert StructureMatcher(primitive_cell=False, scale=False, attempt_supercell=True).fit(
        to_structure(conventional), to_structure(primitive))


def test_corundum_al4o6_needs_the_primitive_cell():
    # R-3c: the conventional (hexagonal) cell holds Al12O18; only the primitive one holds Al4O6
    assert 167 not in compatible_spacegroups("Al4O6")
    primitive = compatible_spacegroups("Al4O6", cell="primitive")
    assert 167 in primitive and set(compatible_spacegroups("Si8")) != set(compatible_spacegroups("Si8", cell="primitive"))
    with pytest.raises(ConfigError, match="primitive"):
        compatible_spacegroups("Al4O6", cell="smallest")
    with pytest.raises(ConstraintError, match="conventional cell"):
        generate_structure("Al4O6", Constraints(), np.random.default_rng(0), spacegroups=[167])
