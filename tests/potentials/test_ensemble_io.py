"""Ensembles, the ASE calculator, learned features and model files."""

import numpy as np
import pytest
import torch
from ase.build import bulk
from nnp_helpers import rattled, ternary_cell, untrained_model

from xtalforge.errors import CheckpointError
from xtalforge.potentials import (
    BPNN,
    FORMAT_VERSION,
    Ensemble,
    NNPCalculator,
    load,
    load_model,
)
from xtalforge.structures.batch import Batch


@pytest.fixture(scope="module")
def ensemble():
    cells = [ternary_cell(k) for k in range(4)]
    return Ensemble([untrained_model(["C", "Si", "Ge"], cells, seed=s) for s in range(3)])


def test_ensemble_mean_and_spread_match_the_members(ensemble):
    structures = [ternary_cell(10), ternary_cell(11).repeat((1, 1, 2))]
    batch = Batch.from_atoms(structures)
    pred = ensemble.predict(batch)
    singles = [m.predict(batch) for m in ensemble.members]
    energies = torch.stack([p.energy for p in singles])
    forces = torch.stack([p.forces for p in singles])
    stresses = torch.stack([p.stress for p in singles])
    assert torch.allclose(pred.energy, energies.mean(0), atol=1e-10)
    assert torch.allclose(pred.energy_std, energies.std(0, correction=0), atol=1e-10)
    assert torch.allclose(pred.forces, forces.mean(0), atol=1e-10)
    assert torch.allclose(pred.forces_std, forces.std(0, correction=0), atol=1e-10)
    assert torch.allclose(pred.stress_std, stresses.std(0, correction=0), atol=1e-12)
    # seed 004 eq. 5, per structure
    n0 = len(structures[0])
    for s, sl in enumerate([slice(0, n0), slice(n0, None)]):
        expected = pred.forces_std[sl].norm(dim=1).max() / pred.forces[sl].norm(dim=1).max()
        assert float(pred.uncertainty[s]) == pytest.approx(float(expected), rel=1e-10)
    assert (pred.energy_std > 0).all() and (pred.uncertainty > 0).all()


def test_single_model_works_where_an_ensemble_does(si_model):
    atoms = rattled(bulk("Si", "diamond", a=5.431, cubic=True), 4)
    pred = si_model.predict(Batch.from_atoms([atoms]), features=True)
    assert torch.all(pred.energy_std == 0) and torch.all(pred.forces_std == 0)
    assert torch.all(pred.uncertainty == 0)
    assert pred.features.shape == (1, si_model.hidden_layers[-1])
    calc = si_model.calculator()
    atoms.calc = calc
    assert atoms.get_potential_energy() == pytest.approx(float(pred.energy[0]))
    assert calc.results["energy_std"] == 0.0


def test_features_are_invariant_mean_pooled_last_hidden_layers(ensemble):
    atoms = ternary_cell(13)
    pred = ensemble.predict(Batch.from_atoms([atoms, atoms.repeat((2, 1, 1))]), features=True)
    assert pred.features.shape == (2, 30)
    # mean over atoms: a supercell has the same descriptor (seed 004 eq. 1)
    assert torch.allclose(pred.features[0], pred.features[1], atol=1e-10)
    shuffled = atoms[np.random.default_rng(0).permutation(len(atoms))]
    again = ensemble.predict_atoms([shuffled], features=True)
    assert torch.allclose(again.features[0], pred.features[0], atol=1e-10)
    per_atom = ensemble.atomic_features(Batch.from_atoms([atoms]))
    assert per_atom.shape == (len(atoms), 30)
    assert torch.allclose(per_atom.mean(0), pred.features[0], atol=1e-10)


def test_ase_calculator_results(ensemble):
    atoms = ternary_cell(14)
    atoms.calc = ensemble.calculator()
    pred = ensemble.predict_atoms([atoms])
    assert atoms.get_potential_energy() == pytest.approx(float(pred.energy[0]), abs=1e-10)
    assert np.allclose(atoms.get_forces(), pred.forces.numpy(), atol=1e-10)
    assert np.allclose(atoms.get_stress(voigt=False), pred.stress[0].numpy(), atol=1e-12)
    results = atoms.calc.results
    assert results["energy_std"] == pytest.approx(float(pred.energy_std[0]))
    assert results["forces_std"].shape == (len(atoms), 3)
    assert results["uncertainty"] == pytest.approx(float(pred.uncertainty[0]))


def test_save_load_round_trip_gives_identical_predictions(tmp_path, ensemble):
    ensemble.metrics = {"energy_rmse_mev_atom": 3.0, "per_model": [{"n_train": 5}]}
    path = tmp_path / "model.pt"
    ensemble.save(path)
    calc = load(path)
    assert isinstance(calc, NNPCalculator)
    loaded = calc.ensemble
    assert loaded.elements == ["C", "Si", "Ge"]
    assert loaded.metrics["energy_rmse_mev_atom"] == 3.0
    assert loaded.descriptor.params() == ensemble.descriptor.params()
    batch = Batch.from_atoms([ternary_cell(15), ternary_cell(16)])
    a, b = ensemble.predict(batch, features=True), loaded.predict(batch, features=True)
    for name in ("energy", "forces", "stress", "energy_std", "forces_std", "uncertainty", "features"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_single_model_file_loads_as_an_ensemble_of_one(tmp_path, si_model):
    path = tmp_path / "single.pt"
    si_model.save(path)
    loaded = load_model(path)
    assert len(loaded) == 1 and isinstance(loaded.members[0], BPNN)


def test_wrong_format_version_is_refused(tmp_path, si_model):
    path = tmp_path / "model.pt"
    si_model.save(path)
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="format version") as info:
        load(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"not a model at all", b"PK\x03\x04 truncated zip"])
def test_corrupt_file_is_a_checkpoint_error(tmp_path, content):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="corrupt") as info:
        load(path)
    assert "\n" not in str(info.value)


def test_missing_file_and_foreign_pickle(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path / "nope.pt")
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not an xtalforge potential"):
        load(path)


def test_empty_batch_and_atoms_without_neighbours(ensemble):
    empty = ensemble.predict(Batch.from_atoms([]))
    assert empty.energy.shape == (0,) and empty.forces.shape == (0, 3)
    from ase import Atoms

    lone = Atoms("Si", positions=[[1.0, 2.0, 3.0]], cell=[20.0, 20.0, 20.0], pbc=True)
    pred = ensemble.predict_atoms([lone, ternary_cell(17)])
    assert torch.all(pred.forces[0] == 0) and torch.all(pred.stress[0] == 0)
    # an atom without neighbours has the network's energy at G = 0, the same in any cell
    assert float(pred.energy[0]) == pytest.approx(float(ensemble.predict_atoms([lone.repeat((2, 1, 1))]).energy[0]) / 2)


def test_calculate_many_gives_each_structure_what_calculate_gives(ensemble):
    structures = [ternary_cell(20), ternary_cell(21).repeat((1, 2, 1)), ternary_cell(22)]
    calc = NNPCalculator(ensemble)
    many = calc.calculate_many(structures, chunk=2)  # two batched calls, one structure in the second
    for atoms, results in zip(structures, many, strict=True):
        calc.calculate(atoms.copy(), ["energy"])
        assert results.keys() == calc.results.keys()
        for key, value in calc.results.items():
            assert np.allclose(results[key], value, rtol=1e-10, atol=1e-12), key


def test_model_hessian_is_the_same_from_batched_and_single_model_calls(ensemble):
    from xtalforge.dynamics import model_hessian

    atoms = ternary_cell(23)
    batched = model_hessian(atoms, NNPCalculator(ensemble), pressure_gpa=1.0)
    single = model_hessian(atoms, NNPCalculator(ensemble), pressure_gpa=1.0, batched=False)
    assert batched.shape == (3 * len(atoms) + 9,) * 2
    assert np.allclose(batched, single, rtol=1e-8, atol=1e-8)
