"""Space groups at several spglib tolerances."""

import numpy as np
import pytest
from ase import Atoms
from ase.io import read

from xtalforge.similarity import spacegroup


@pytest.mark.parametrize(
    "name, number",
    [
        ("Si_diamond_Fd-3m.cif", 227),
        ("Si_lonsdaleite_P63mmc.cif", 194),
        ("NaCl_rocksalt_Fm-3m.cif", 225),
        ("Si_beta-tin_I41amd.cif", 141),
        ("Si_BC8_Ia-3.cif", 206),
    ],
)
def test_reference_structures(reference_dir, name, number):
    info = spacegroup(read(reference_dir / name))
    assert info.number == number
    assert all(hit[0] == number for hit in info.per_tolerance.values())
    assert info.symprec == 0.1


def test_slightly_distorted_structure_depends_on_tolerance(reference_dir):
    diamond = read(reference_dir / "Si_diamond_Fd-3m.cif")
    diamond.positions[0] += [0.004, 0.0, 0.0]
    info = spacegroup(diamond, symprec=(1e-3, 1e-2, 0.1))
    assert info.per_tolerance[1e-3][0] < 227  # the tight tolerance sees the distortion
    assert info.per_tolerance[0.1] == (227, "Fd-3m")
    assert info.number == 227 and info.symprec == 0.1  # the loosest tolerance is reported
    assert info.label == f"{info.symbol} ({info.number})"


def test_overlapping_atoms_give_unknown_not_an_exception():
    overlapping = Atoms("Si2", positions=[[0, 0, 0], [0, 0, 1e-4]], cell=[3, 3, 3], pbc=True)
    info = spacegroup(overlapping, symprec=(0.1, 0.2))
    assert info.number is None and info.symbol is None and info.label == "?"
    assert set(info.per_tolerance) == {0.1, 0.2}


def test_tolerance_order_does_not_matter(reference_dir):
    lonsdaleite = read(reference_dir / "Si_lonsdaleite_P63mmc.cif")
    assert spacegroup(lonsdaleite, symprec=(0.1, 1e-3, 1e-2)) == spacegroup(lonsdaleite)
    rng = np.random.default_rng(0)
    shuffled = lonsdaleite[rng.permutation(len(lonsdaleite))]
    assert spacegroup(shuffled).number == 194
