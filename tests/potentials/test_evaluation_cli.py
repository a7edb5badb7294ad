"""evaluate(), parity plots and the `train` / `evaluate` subcommands."""

import argparse
import json

import pytest
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from nnp_helpers import sw_calculator, sw_frames, ternary_cell

from xtalforge.errors import ConfigError, XtalforgeError
from xtalforge.potentials import evaluate, load, parity_plot
from xtalforge.potentials.commands import load_potential_config, register


@pytest.fixture(scope="module")
def frames():
    return sw_frames(seed=5, n_strained=16, n_md=4)


def relabelled(frames, model):
    """Frames whose labels are the model's own predictions."""
    pred = model.predict_atoms(frames)
    out, start = [], 0
    for k, atoms in enumerate(frames):
        copy = atoms.copy()
        stress = pred.stress[k].numpy()
        copy.calc = SinglePointCalculator(copy, energy=float(pred.energy[k]),
                                          forces=pred.forces[start: start + len(atoms)].numpy(),
                                          stress=stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]])
        out.append(copy)
        start += len(atoms)
    return out


def test_evaluate_a_model_against_its_own_predictions(ternary_model):
    structures = [ternary_cell(k) for k in range(6)]
    result = evaluate(ternary_model, relabelled(structures, ternary_model))
    assert result["n_frames"] == 6
    for key in ("energy_rmse_mev_atom", "energy_mae_mev_atom", "force_rmse_ev_a", "force_mae_ev_a",
                "stress_rmse_kbar", "stress_mae_kbar"):
        assert result[key] == pytest.approx(0.0, abs=1e-6), key
    assert result["energy_pearson_r"] == pytest.approx(1.0)


def test_evaluate_any_ase_calculator_and_known_errors(frames):
    # SW against its own labels: zero error through the one-at-a-time ASE path
    result = evaluate(sw_calculator(), frames)
    assert result["force_rmse_ev_a"] == pytest.approx(0.0, abs=1e-10)
    # shifting every label by 0.1 eV/atom gives exactly 100 meV/atom RMSE and MAE, and r = 1
    shifted = []
    for atoms in frames:
        copy = atoms.copy()
        copy.calc = SinglePointCalculator(copy, energy=atoms.get_potential_energy() + 0.1 * len(atoms),
                                          forces=atoms.get_forces())
        shifted.append(copy)
    result = evaluate(sw_calculator(), shifted)
    assert result["energy_rmse_mev_atom"] == pytest.approx(100.0)
    assert result["energy_mae_mev_atom"] == pytest.approx(100.0)
    assert result["energy_pearson_r"] == pytest.approx(1.0)
    assert result["stress_rmse_kbar"] is None  # no stress labels in these frames


def test_parity_plot_writes_a_png(tmp_path, si_model, frames):
    path = parity_plot(si_model, frames, tmp_path / "plots" / "parity.png", title="untrained")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="xtalforge")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_train_and_evaluate_commands(tmp_path, frames, capsys):
    data = tmp_path / "data.extxyz"
    write(data, frames)
    config = tmp_path / "nnp.toml"
    config.write_text("[potential]\nepochs = 2\nhidden_layers = [6, 6]\nbatch_size = 8\n")
    model = tmp_path / "model.pt"
    assert run_cli(["train", str(data), "--out", str(model), "--ensemble", "2", "--config", str(config),
                    "--seed", "1", "--quiet"]) == 0
    assert "wrote 2-model potential for Si" in capsys.readouterr().out
    assert len(load(model).ensemble) == 2

    assert run_cli(["evaluate", str(model), str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n_frames"] == len(frames) and result["force_rmse_ev_a"] > 0
    assert (tmp_path / "model_parity.png").is_file()

    plot = tmp_path / "p.png"
    assert run_cli(["evaluate", str(model), str(data), "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "RMSE" in text and "Pearson r" in text and plot.is_file()

    large = tmp_path / "large.extxyz"
    write(large, [relabel_supercell(frames[0])])
    assert run_cli(["evaluate", str(model), str(data), "--no-plot", "--scale-up", str(large), "--json"]) == 0
    scale = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["scale_up"]
    assert scale["large"]["n_atoms"] == [8 * len(frames[0])]
    assert scale["energy_rmse_mev_atom_ratio"] > 0


def relabel_supercell(atoms):
    """A 2x2x2 supercell with Stillinger-Weber labels (a larger cell of the same material)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    big = atoms.copy() * (2, 2, 2)
    big.calc = sw_calculator()
    labels = dict(energy=big.get_potential_energy(), forces=big.get_forces(), stress=big.get_stress())
    big.calc = SinglePointCalculator(big, **labels)
    return big


def test_train_from_an_ase_database(tmp_path, frames, capsys):
    from ase.db import connect

    path = tmp_path / "data.db"
    with connect(str(path)) as db:
        for atoms in frames[:10]:
            db.write(atoms)
    model = tmp_path / "m.pt"
    config = tmp_path / "c.toml"
    config.write_text("epochs = 1\nn_models = 1\nhidden_layers = [4]\n")  # a bare potential table
    assert run_cli(["train", str(path), "--out", str(model), "--config", str(config), "--quiet"]) == 0
    assert load(model).ensemble.metrics["n_train"] + load(model).ensemble.metrics["n_val"] <= 10


def test_command_errors_are_one_line(tmp_path):
    with pytest.raises(XtalforgeError, match="not found"):
        run_cli(["train", str(tmp_path / "missing.extxyz"), "--out", str(tmp_path / "m.pt")])
    bad = tmp_path / "bad.toml"
    bad.write_text("[potential]\nepoch = 3\n")
    with pytest.raises(ConfigError, match="potential.epoch"):
        load_potential_config(bad)
    unlabelled = tmp_path / "plain.extxyz"
    write(unlabelled, [ternary_cell(0)])
    with pytest.raises(XtalforgeError, match="no structures with energies"):
        run_cli(["train", str(unlabelled), "--out", str(tmp_path / "m.pt")])
