"""Elastic-deformation augmentation: geometry of the strains, oracle labels, CLI."""

from __future__ import annotations

import argparse
import numpy as np
import pytest
from ase.calculators.calculator import Calculator
from ase.io import read

from xtalforge.config import OracleConfig
from xtalforge.datasets.commands import register
from xtalforge.datasets.deform import (
    DEFORMATIONS,
    elastic_deformations,
    label_deformations,
    strain_tensors,
    strain_values,
)
from xtalforge.oracles import Oracle, build_oracle

GPA = 160.21766208


@pytest.fixture
def diamond(si_diamond):
    return si_diamond.copy()


def test_strain_values_are_symmetric_and_skip_zero():
    assert np.allclose(strain_values(0.04, 4), [-0.04, -0.04 / 3, 0.04 / 3, 0.04])
    assert np.allclose(strain_values(0.04, 5), [-0.04, -0.02, 0.02, 0.04])
    with pytest.raises(ValueError):
        strain_values(0.0, 3)


def test_deformations_strain_the_cell_and_keep_fractional_coordinates(diamond):
    frames = elastic_deformations(diamond, max_strain=0.03, n_strains=2)
    # undeformed + (1 hydrostatic + 3 uniaxial + 3 shear) × 2 amplitudes
    assert len(frames) == 1 + 7 * 2
    assert {f.info["deformation"] for f in frames} >= {"none", "hydrostatic", "uniaxial_x", "shear_xy"}
    v0 = diamond.get_volume()
    for frame in frames:
        assert np.allclose(frame.get_scaled_positions(), diamond.get_scaled_positions())
        eps = frame.info["strain"]
        kind = frame.info["deformation"]
        if kind == "hydrostatic":
            assert frame.get_volume() == pytest.approx(v0 * (1 + eps) ** 3)
        elif kind.startswith("uniaxial"):
            assert frame.get_volume() == pytest.approx(v0 * (1 + eps))
        elif kind.startswith("shear"):
            # A symmetric shear of γ changes the volume only at second order: 1 - γ²/4.
            assert frame.get_volume() == pytest.approx(v0 * (1 - eps**2 / 4))
    with pytest.raises(ValueError, match="unknown deformation"):
        strain_tensors("twist", 0.01)


def test_oracle_labels_give_stillinger_weber_elastic_constants(diamond):
    """Stress-strain slopes of the labelled frames are SW silicon's C11, C12 and B (PRB 31, 5262)."""
    oracle = build_oracle(OracleConfig(name="sw"))
    frames, failures = label_deformations([diamond], oracle, max_strain=0.005, n_strains=2)
    assert not failures and oracle.calls == len(frames) == 15
    by_label = {(f.info["deformation"], f.info["strain"]): f for f in frames}
    plus, minus = by_label[("uniaxial_x", 0.005)], by_label[("uniaxial_x", -0.005)]
    c11 = (plus.get_stress()[0] - minus.get_stress()[0]) / 0.01 * GPA
    c12 = (plus.get_stress()[1] - minus.get_stress()[1]) / 0.01 * GPA
    assert c11 == pytest.approx(151.4, rel=0.05)
    assert c12 == pytest.approx(76.4, rel=0.05)
    hydro_plus, hydro_minus = by_label[("hydrostatic", 0.005)], by_label[("hydrostatic", -0.005)]
    bulk = (hydro_plus.get_stress()[0] - hydro_minus.get_stress()[0]) / (3 * 0.01) * GPA
    assert bulk == pytest.approx((c11 + 2 * c12) / 3, rel=0.02)
    # Diamond is SW's minimum: every deformation raises the energy.
    e0 = by_label[("none", 0.0)].get_potential_energy()
    assert all(f.get_potential_energy() > e0 for f in frames if f.info["deformation"] != "none")


class Exploding(Calculator):
    implemented_properties = ["energy", "forces", "stress"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        raise RuntimeError("SCF exploded")


def test_failed_single_points_are_reported_not_raised(diamond):
    oracle = Oracle("exploding", Exploding())
    frames, failures = label_deformations([diamond], oracle, kinds=("hydrostatic",), n_strains=2)
    assert frames == [] and len(failures) == 3
    assert "hydrostatic" in failures[1] and "SCF exploded" in failures[1]


def test_cli_deform_writes_labelled_extxyz(tmp_path, diamond, capsys):
    source = tmp_path / "si.extxyz"
    diamond.write(source)
    out = tmp_path / "deformed.extxyz"
    parser = argparse.ArgumentParser(prog="xtalforge")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["dataset", "deform", str(source), "--out", str(out), "--oracle", "sw",
                              "--kinds", "shear", "--n-strains", "2", "--max-strain", "0.02"])
    assert args.func(args) == 0
    frames = read(out, index=":")
    assert len(frames) == 1 + 3 * 2
    assert all(f.info["phase"] == "deform" for f in frames)
    assert all(f.get_stress().shape == (6,) and f.get_forces().shape == (8, 3) for f in frames)
    assert "oracle calls: 7" in capsys.readouterr().out
    assert set(DEFORMATIONS) == {"hydrostatic", "uniaxial", "shear"}
