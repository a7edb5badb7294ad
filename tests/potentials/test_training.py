"""Training: preprocessing pieces, reproducibility, ensembles, and a Stillinger–Weber fit."""

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from nnp_helpers import labelled, rattled, sw_calculator, sw_frames, ternary_cell

from xtalforge.config import PotentialConfig
from xtalforge.errors import XtalforgeError
from xtalforge.potentials import evaluate, train_ensemble, train_model
from xtalforge.potentials.training import (
    prepare,
    reference_energies,
    whitening,
)

QUICK = {"epochs": 3, "batch_size": 8, "n_models": 1, "hidden_layers": [8, 8]}


@pytest.fixture(scope="module")
def sw_train():
    return sw_frames(seed=0, n_strained=80, n_md=40)


@pytest.fixture(scope="module")
def sw_test():
    return sw_frames(seed=1, n_strained=20, n_md=10)


def with_energy(atoms, energy, forces=None):
    atoms = atoms.copy()
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    return atoms


def test_reference_energies_by_least_squares():
    # energies exactly linear in the composition: least squares recovers the per-element energies
    rng = np.random.default_rng(0)
    frames = []
    for k in range(6):
        atoms = ternary_cell(k)
        symbols = rng.choice(["C", "Si", "Ge"], size=len(atoms))
        atoms.set_chemical_symbols(symbols)
        counts = {s: int((symbols == s).sum()) for s in ("C", "Si", "Ge")}
        energy = -7.0 * counts["C"] - 4.5 * counts["Si"] - 3.8 * counts["Ge"]
        frames.append(with_energy(atoms, energy))
    _, data = prepare(frames, PotentialConfig(zbl=False), log=lambda m: None)
    assert np.allclose(reference_energies(data), [-7.0, -4.5, -3.8])


def test_whitening_gives_uncorrelated_unit_variance_inputs():
    rng = np.random.default_rng(1)
    base = torch.as_tensor(rng.normal(size=(500, 3)))
    mixing = torch.as_tensor([[1.0, 200.0, 0.0, 1.0, 5.0], [0.0, 1.0, 0.001, 3.0, 0.0], [2.0, 0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    features = base @ mixing + 1000.0  # 5 correlated columns, rank 3, large offset
    mean, transform = whitening(features, torch.zeros(500, dtype=torch.long), 1)
    z = (features - mean[0]) @ transform[0]
    kept = transform[0].abs().sum(0) > 0
    assert int(kept.sum()) == 3  # the two redundant directions are dropped
    cov = torch.cov(z[:, kept].T)
    assert torch.allclose(cov, torch.eye(3, dtype=cov.dtype), atol=1e-8)


def test_force_outliers_are_left_out(sw_train):
    frames = [f.copy() for f in sw_train[:40]]
    for f, src in zip(frames, sw_train[:40]):
        f.calc = src.calc
    crazy = frames[5].copy()
    crazy.calc = SinglePointCalculator(crazy, energy=frames[5].get_potential_energy(),
                                       forces=frames[5].get_forces() * 50.0, stress=frames[5].get_stress())
    frames[5] = crazy
    messages = []
    _, data = prepare(frames, PotentialConfig(), log=messages.append)
    assert data.n_outliers >= 1 and len(data) == 40 - data.n_outliers
    assert all(np.abs(f.get_forces()).max() < 40 for f in data.frames)
    assert any("left out" in m for m in messages)


def test_energy_window_is_measured_per_composition():
    si = [with_energy(rattled(bulk("Si", "diamond", a=5.431, cubic=True), k, sigma=0.05, strain=0.0), e)
          for k, e in enumerate((-40.0, -39.0, -24.0))]  # -5.0, -4.875 and -3.0 eV/atom
    c = [with_energy(rattled(bulk("C", "diamond", a=3.567, cubic=True), k, sigma=0.05, strain=0.0), e)
         for k, e in enumerate((-60.0, -58.0, -50.0))]  # -7.5, -7.25 and -6.25 eV/atom
    messages = []
    config = PotentialConfig(energy_window=0.5, force_outlier_sigma=None, zbl=False)
    _, data = prepare(si + c, config, log=messages.append)
    assert data.n_above_window == 2 and len(data) == 4
    assert sorted(round(float(e), 1) for e in data.energy) == [-60.0, -58.0, -40.0, -39.0]
    assert any("eV/atom above the lowest of their composition" in m for m in messages)
    _, everything = prepare(si + c, PotentialConfig(force_outlier_sigma=None, zbl=False), log=lambda m: None)
    assert len(everything) == 6 and everything.n_above_window == 0
    # a window that would keep fewer than half of a composition's frames keeps its lower half
    _, half = prepare(si + c, PotentialConfig(energy_window=0.01, force_outlier_sigma=None, zbl=False), log=lambda m: None)
    assert sorted(round(float(e), 1) for e in half.energy) == [-60.0, -58.0, -40.0, -39.0]
    with pytest.raises(XtalforgeError, match="energy_window"):
        prepare(si, PotentialConfig(energy_window=0.0), log=lambda m: None)


def test_gdf_weights_favour_rare_environments():
    # many near-identical diamond cells and one strongly distorted cell
    frames = [with_energy(rattled(bulk("Si", "diamond", a=5.431, cubic=True), k, sigma=0.01, strain=0.0), -30.0)
              for k in range(15)]
    odd = rattled(bulk("Si", "diamond", a=5.431, cubic=True), 99, sigma=0.35, strain=0.1)
    frames.append(with_energy(odd, -25.0))
    config = PotentialConfig(gdf_weighting=True, zbl=False, force_outlier_sigma=None)
    _, data = prepare(frames, config, log=lambda m: None)
    weights = torch.cat(data.atom_weights)
    assert weights.mean().item() == pytest.approx(1.0)
    assert weights.max() <= config.gdf_max_weight
    assert data.atom_weights[-1].mean() > 2 * torch.cat(data.atom_weights[:-1]).mean()


def test_zbl_onset_is_the_shortest_training_distance(sw_train):
    template, data = prepare(sw_train[:30], PotentialConfig(), log=lambda m: None)
    # over the frames kept for training (force outliers are left out first)
    shortest = min(np.min(f.get_all_distances(mic=True)[np.triu_indices(len(f), 1)]) for f in data.frames)
    assert float(template.zbl_onset[0, 0]) == pytest.approx(shortest, abs=1e-9)


def test_zbl_pushes_a_collapsing_pair_apart(sw_train):
    config = PotentialConfig(**QUICK)
    model = train_model(sw_train[:20], config, progress=False).to(torch.float64)
    onset = float(model.zbl_onset[0, 0])
    atoms = bulk("Si", "diamond", a=5.431, cubic=True)
    energies, forces = [], []
    for d in (onset - 0.9, onset - 0.6, onset - 0.3):
        a = atoms.copy()
        a.positions[1] = a.positions[0] + d * np.array([1, 1, 1]) / np.sqrt(3)
        pred = model.predict_atoms([a])
        energies.append(float(pred.energy[0]))
        forces.append(pred.forces[1].numpy() @ (np.array([1, 1, 1]) / np.sqrt(3)))
    assert energies[0] > energies[1] > energies[2]
    assert forces[0] > forces[1] > 0  # pushes atom 1 away from atom 0
    no_zbl = train_model(sw_train[:20], PotentialConfig(**QUICK, zbl=False), progress=False)
    assert float(no_zbl.zbl_onset.abs().sum()) == 0.0


def test_training_is_reproducible_with_a_seed(sw_train):
    config = PotentialConfig(**QUICK)
    a = train_model(sw_train[:24], config, seed=3, progress=False)
    b = train_model(sw_train[:24], config, seed=3, progress=False)
    c = train_model(sw_train[:24], config, seed=4, progress=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.networks[0].output.weight, c.networks[0].output.weight)


def test_ensemble_members_differ_and_record_metrics(sw_train):
    config = PotentialConfig(**{**QUICK, "n_models": 3})
    ens = train_ensemble(sw_train[:24], config, progress=False)
    assert len(ens) == 3 and ens.elements == ["Si"]
    weights = [m.networks[0].output.weight for m in ens.members]
    assert not torch.equal(weights[0], weights[1])
    for key in ("energy_rmse_mev_atom", "force_rmse_ev_a", "stress_rmse_kbar", "n_train", "n_val"):
        assert key in ens.metrics and len(ens.metrics["per_model"]) == 3
    assert ens.metrics["n_train"] + ens.metrics["n_val"] + ens.metrics["n_outliers"] == 24
    pred = ens.predict_atoms(sw_train[:2])
    assert (pred.energy_std > 0).all()


def test_replica_ensemble_follows_the_reference_atomic_energies(sw_train):
    config = PotentialConfig(**{**QUICK, "n_models": 3, "ensemble": "replica", "epochs": 6})
    ens = train_ensemble(sw_train[:24], config, progress=False)
    widths = [m.hidden_layers for m in ens.members]
    assert len(set(map(tuple, widths))) == 3  # replicas differ in size (seed 003 sec. 5)
    for replica in ens.members[1:]:
        assert replica.metrics["replica_of"] == "model 1"
        assert replica.metrics["atomic_energy_rmse_mev"] >= 0
    pred = ens.predict_atoms(sw_train[:2], features=True)
    assert pred.features.shape == (2, widths[0][-1])


def test_frames_without_stress_and_unlabelled_frames(sw_train):
    frames = []
    for k, f in enumerate(sw_train[:16]):
        copy = f.copy()
        results = dict(f.calc.results)
        if k % 2:
            results.pop("stress")
        copy.calc = SinglePointCalculator(copy, **results)
        frames.append(copy)
    frames.append(bulk("Si", "diamond", a=5.431))  # no labels at all
    messages = []
    model = train_model(frames, PotentialConfig(**QUICK), progress=False, log=messages.append)
    assert model.metrics["n_unlabelled"] == 1
    with pytest.raises(XtalforgeError, match="no frame carries an energy"):
        train_model([bulk("Si", "diamond", a=5.431)], PotentialConfig(**QUICK), progress=False)


@pytest.mark.slow
def test_short_stillinger_weber_training_reaches_force_accuracy(sw_train, sw_test):
    config = PotentialConfig(
        n_models=1, epochs=80, batch_size=4, lr=5e-3, lr_patience=8, target_force_ev_a=0.1,
        target_energy_mev_atom=5.0, target_stress_kbar=10.0,
    )
    model = train_model(sw_train, config, seed=0, progress=False)
    result = evaluate(model, sw_test)
    assert result["force_rmse_ev_a"] < 0.15, result
    assert result["energy_rmse_mev_atom"] < 15.0, result
    assert result["energy_pearson_r"] > 0.99, result
    # the same accuracy through the ASE calculator of a saved-and-loaded model
    atoms = sw_test[3].copy()
    atoms.calc = model.calculator()
    sw = labelled(sw_test[3], sw_calculator())
    assert np.sqrt(np.mean((atoms.get_forces() - sw.get_forces()) ** 2)) < 0.3
