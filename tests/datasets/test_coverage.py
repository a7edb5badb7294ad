"""Coverage of a training set (descriptor PCA), NNP-vs-oracle energy correlation, scale-up check."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from xtalforge.config import OracleConfig, PotentialConfig, from_dict
from xtalforge.datasets.commands import register
from xtalforge.datasets.coverage import (
    coverage_pca,
    energy_correlation,
    plot_coverage,
    scale_up_report,
    symmetry_vectors,
)
from xtalforge.oracles import build_oracle

POLYMORPHS = ("Si_diamond_Fd-3m", "Si_lonsdaleite_P63mmc", "Si_beta-tin_I41amd")


@pytest.fixture(scope="module")
def rattled_diamond(si_diamond):
    """Diamond Si8 rattled by 0.02-0.15 Å and strained by up to ±3 %, labelled with Stillinger-Weber."""
    rng = np.random.default_rng(0)
    oracle = build_oracle(OracleConfig(name="sw"))
    frames = []
    for k in range(24):
        atoms = si_diamond.copy()
        atoms.set_cell(atoms.cell.array * (1 + rng.uniform(-0.03, 0.03)), scale_atoms=True)
        atoms.positions += rng.normal(scale=0.02 + 0.13 * k / 23, size=atoms.positions.shape)
        frames.append(oracle.single_point(atoms).to_atoms(atoms))
    return frames


@pytest.fixture(scope="module")
def polymorphs(reference_dir):
    out = []
    for name in POLYMORPHS:
        atoms = read(reference_dir / f"{name}.cif")
        atoms.info["name"] = name.split("_")[1]
        out.append(atoms)
    return out


@pytest.fixture(scope="module")
def model(rattled_diamond):
    from xtalforge.potentials import train_ensemble

    return train_ensemble(rattled_diamond, from_dict(PotentialConfig, {"hidden_layers": [8, 8], "epochs": 30}),
                          n_models=2, seed=0, progress=False)


def test_symmetry_vectors_are_invariant_and_see_equivalent_atoms(si_diamond):
    g = symmetry_vectors([si_diamond])["Si"]
    assert g.shape == (8, 26)  # 8 radial + 18 angular for one element
    assert np.allclose(g, g[0], atol=1e-9)  # every diamond atom has the same environment
    moved = si_diamond.copy()
    moved.positions += [0.3, -1.1, 2.0]
    moved.wrap()
    moved = moved[np.random.default_rng(1).permutation(len(moved))]
    assert np.allclose(symmetry_vectors([moved])["Si"], g, atol=1e-9)


def test_pca_puts_known_environments_inside_and_new_ones_outside(rattled_diamond, polymorphs, tmp_path):
    pca = coverage_pca(rattled_diamond, polymorphs)
    entry = pca["Si"]
    assert entry["n_train_atoms"] == 24 * 8
    assert entry["train_pc"].shape == (24 * 8, 2)
    assert entry["crystal_pc"].shape == (8 + 4 + 4, 2)
    for owner, atoms in enumerate(polymorphs):
        assert (entry["crystal_owner"] == owner).sum() == len(atoms)
    # Diamond environments are in a rattled-diamond training set; beta-tin's six-fold ones are not.
    distance = entry["crystal_distance_over_radius"]
    assert np.all(distance[entry["crystal_owner"] == 0] <= 1.0)
    assert np.all(distance[entry["crystal_owner"] == 2] > 1.0)
    assert 0.0 < entry["inside_fraction"] < 1.0
    path = plot_coverage(pca, tmp_path / "pca.png", ["diamond", "lonsdaleite", "beta-tin"])
    assert path.stat().st_size > 10_000


def test_energy_correlation_uses_the_oracle_minimum_and_the_window():
    reference = [-4.30, -4.29, -4.20, -4.00]  # eV/atom: 0, 10, 100, 300 meV/atom above the lowest
    nnp = [-5.00, -4.98, -4.91, -4.60]  # a constant offset does not matter
    result = energy_correlation(nnp, reference, ["a", "b", "c", "d"], window_ev=0.2)
    assert result["n_within"] == 3 and result["reference_lowest"] == "a" and result["lowest_agrees"]
    assert result["order_agrees"] and result["nnp_order"] == ["a", "b", "c", "d"]
    deltas = np.array([0, 20, 90]) - np.array([0, 10, 100])  # meV/atom, within the window
    assert result["rmse_mev_per_atom"] == pytest.approx(np.sqrt(np.mean(deltas**2)))
    assert result["pearson_r"] == pytest.approx(np.corrcoef([0, 10, 100], [0, 20, 90])[0, 1])
    swapped = energy_correlation([-4.28, -4.30, -4.2, -4.0], reference, ["a", "b", "c", "d"])
    assert not swapped["lowest_agrees"] and swapped["nnp_lowest"] == "b"
    # Two structures in the window: r is undefined, not a fake 1.0.
    assert energy_correlation([-1.0, -0.9, 0.0], [-1.0, -0.95, 0.0])["pearson_r"] is None


def test_scale_up_report_on_supercells_of_the_training_cells(model, rattled_diamond):
    small = rattled_diamond[:6]
    large = [atoms.repeat((2, 1, 1)) for atoms in small]
    for big, atoms in zip(large, small):
        big.calc = SinglePointCalculator(big, energy=2 * atoms.get_potential_energy(),
                                         forces=np.tile(atoms.get_forces(), (2, 1)), stress=atoms.get_stress())
    report = scale_up_report(model, small, large)
    assert report["small"]["n_atoms"] == [8] and report["large"]["n_atoms"] == [16]
    # A local potential is extensive: a doubled cell has the per-atom errors of the cell
    # (up to float32 round-off).
    assert report["energy_rmse_mev_atom_ratio"] == pytest.approx(1.0, rel=1e-4)
    assert report["force_rmse_ev_a_ratio"] == pytest.approx(1.0, rel=1e-4)


def test_cli_coverage_writes_figures_and_correlation(model, rattled_diamond, reference_dir, tmp_path, capsys):
    train = tmp_path / "train.extxyz"
    write(train, rattled_diamond)
    model_path = tmp_path / "model.pt"
    model.save(model_path)
    out = tmp_path / "coverage"
    parser = argparse.ArgumentParser(prog="xtalforge")
    register(parser.add_subparsers(dest="command"))
    structures = [str(reference_dir / f"{name}.cif") for name in POLYMORPHS]
    args = parser.parse_args(["dataset", "coverage", "--train", str(train), "--structures", *structures,
                              "--out", str(out), "--model", str(model_path), "--oracle", "sw"])
    assert args.func(args) == 0
    assert (out / "coverage_pca.png").stat().st_size > 10_000
    assert (out / "correlation.png").stat().st_size > 10_000
    correlation = json.loads((out / "correlation.json").read_text())
    assert correlation["n_structures"] == 3 and correlation["oracle_calls"] == 3
    assert correlation["reference_lowest"] in {"Si_diamond_Fd-3m", "Si_lonsdaleite_P63mmc"}
    rows = {row["name"]: row for row in correlation["structures"]}
    sw = build_oracle(OracleConfig(name="sw"))
    diamond = read(reference_dir / "Si_diamond_Fd-3m.cif")
    assert rows["Si_diamond_Fd-3m"]["reference_ev_per_atom"] == pytest.approx(
        sw.single_point(diamond).energy / len(diamond))
    summary = json.loads((out / "coverage.json").read_text())
    assert summary["pca"]["Si"]["inside_by_structure"]["Si_diamond_Fd-3m"] == 1.0
    assert summary["pca"]["Si"]["inside_by_structure"]["Si_beta-tin_I41amd"] == 0.0
    assert "correlation" in summary
    assert "NNP vs oracle" in capsys.readouterr().out
