"""Physics of the potential: invariances, extensivity, forces and stress as energy derivatives."""

import copy

import numpy as np
import pytest
import torch
from ase.build import bulk
from nnp_helpers import rattled, ternary_cell, untrained_model
from scipy.spatial.transform import Rotation

from xtalforge.potentials import Ensemble, SymmetryFunctions
from xtalforge.structures.batch import Batch


def predict(model, atoms_list, **kwargs):
    return model.predict(Batch.from_atoms(list(atoms_list)), **kwargs)


def energy(model, atoms) -> float:
    return float(predict(model, [atoms], stress=False).energy[0])


@pytest.fixture(params=["si", "ternary"])
def case(request, si_model, ternary_model):
    if request.param == "si":
        return si_model, rattled(bulk("Si", "diamond", a=5.431, cubic=True), 11)
    return ternary_model, ternary_cell(12)


def test_translation_invariance(case):
    model, atoms = case
    moved = atoms.copy()
    moved.positions += np.array([0.37, -1.9, 12.4])
    a, b = predict(model, [atoms]), predict(model, [moved])
    assert float(a.energy[0]) == pytest.approx(float(b.energy[0]), abs=1e-10)
    assert torch.allclose(a.forces, b.forces, atol=1e-10)
    assert torch.allclose(a.stress, b.stress, atol=1e-12)


def test_rotation_invariance_and_force_covariance(case):
    model, atoms = case
    rotation = Rotation.from_euler("xyz", [0.3, -1.1, 2.0]).as_matrix()
    turned = atoms.copy()
    turned.set_cell(atoms.cell[:] @ rotation.T, scale_atoms=False)
    turned.positions = atoms.positions @ rotation.T
    a, b = predict(model, [atoms]), predict(model, [turned])
    assert float(a.energy[0]) == pytest.approx(float(b.energy[0]), abs=1e-9)
    r = torch.as_tensor(rotation)
    assert torch.allclose(a.forces @ r.T, b.forces, atol=1e-9)
    assert torch.allclose(r @ a.stress[0] @ r.T, b.stress[0], atol=1e-11)


def test_permutation_invariance(case):
    model, atoms = case
    order = np.random.default_rng(3).permutation(len(atoms))
    shuffled = atoms[order]
    a, b = predict(model, [atoms]), predict(model, [shuffled])
    assert float(a.energy[0]) == pytest.approx(float(b.energy[0]), abs=1e-10)
    assert torch.allclose(a.forces[order], b.forces, atol=1e-10)


def test_choice_of_periodic_images_and_cell(case):
    model, atoms = case
    # atoms moved by lattice vectors, and the same lattice described by another basis
    shifted = atoms.copy()
    shifted.positions += np.array([[2, -1, 3]]) @ atoms.cell[:] * (np.arange(len(atoms)) % 2)[:, None]
    other_basis = atoms.copy()
    unimodular = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 1]])
    other_basis.set_cell(unimodular @ atoms.cell[:], scale_atoms=False)
    other_basis.wrap()
    ref = predict(model, [atoms])
    for variant in (shifted, other_basis):
        got = predict(model, [variant])
        assert float(got.energy[0]) == pytest.approx(float(ref.energy[0]), abs=1e-9)
        assert torch.allclose(got.forces, ref.forces, atol=1e-9)
        assert torch.allclose(got.stress, ref.stress, atol=1e-11)


def test_extensivity_of_a_supercell(case):
    model, atoms = case
    supercell = atoms.repeat((2, 2, 2))
    small, big = predict(model, [atoms]), predict(model, [supercell])
    assert float(big.energy[0]) == pytest.approx(8 * float(small.energy[0]), rel=1e-12)
    assert torch.allclose(big.forces[: len(atoms)], small.forces, atol=1e-9)
    assert torch.allclose(big.stress, small.stress, atol=1e-11)


@pytest.mark.parametrize("angular, zbl_onset", [("g5", 0.0), ("g5", 2.6), ("g4", 2.6)])
def test_forces_are_minus_the_finite_difference_gradient(angular, zbl_onset):
    atoms = ternary_cell(5)
    atoms.positions[1] = atoms.positions[0] + [1.2, 0.6, 0.4]  # a short bond, inside the ZBL range
    model = untrained_model(["C", "Si", "Ge"], [ternary_cell(k) for k in range(3)], seed=4,
                            descriptor=SymmetryFunctions(angular=angular), zbl_onset=zbl_onset)
    forces = predict(model, [atoms], stress=False).forces.numpy()
    h = 1e-5
    for atom in (0, 1, 7):
        for axis in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[atom, axis] += h
            minus.positions[atom, axis] -= h
            numeric = -(energy(model, plus) - energy(model, minus)) / (2 * h)
            assert forces[atom, axis] == pytest.approx(numeric, abs=1e-6)
    assert np.allclose(forces.sum(0), 0.0, atol=1e-10)  # Newton's third law


@pytest.mark.parametrize("angular", ["g5", "g4"])
def test_stress_is_the_finite_strain_derivative(angular):
    atoms = ternary_cell(6)
    model = untrained_model(["C", "Si", "Ge"], [ternary_cell(k) for k in range(3)], seed=5,
                            descriptor=SymmetryFunctions(angular=angular), zbl_onset=2.2)
    stress = predict(model, [atoms]).stress[0].numpy()
    eps = 1e-6
    numeric = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            strain = np.zeros((3, 3))
            strain[a, b] = eps
            plus, minus = atoms.copy(), atoms.copy()
            plus.set_cell(atoms.cell[:] @ (np.eye(3) + strain), scale_atoms=True)
            minus.set_cell(atoms.cell[:] @ (np.eye(3) - strain), scale_atoms=True)
            numeric[a, b] = (energy(model, plus) - energy(model, minus)) / (2 * eps) / atoms.get_volume()
    assert np.allclose(stress, numeric, atol=1e-8)
    assert np.allclose(stress, stress.T, atol=1e-12)


def test_batched_prediction_equals_one_by_one(ternary_model):
    structures = [ternary_cell(k) for k in range(5)]
    structures[2] = structures[2].repeat((1, 2, 1))  # different sizes and widths in one batch
    batched = predict(ternary_model, structures)
    start = 0
    for k, atoms in enumerate(structures):
        single = predict(ternary_model, [atoms])
        assert float(batched.energy[k]) == pytest.approx(float(single.energy[0]), abs=1e-10)
        assert torch.allclose(batched.forces[start: start + len(atoms)], single.forces, atol=1e-10)
        assert torch.allclose(batched.stress[k], single.stress[0], atol=1e-12)
        start += len(atoms)


def test_chunked_evaluation_equals_one_pass(ternary_model):
    from xtalforge.potentials.model import evaluate_members

    structures = [ternary_cell(k) for k in range(4)]
    dense = ternary_cell(9)
    dense.set_cell(dense.cell[:] * 0.85, scale_atoms=True)  # more neighbours: a wider slot matrix
    structures.insert(2, dense)
    graph = ternary_model.graph(Batch.from_atoms(structures))
    assert int(graph.n_slots[:16].max()) < graph.width  # chunks of the other cells are trimmed
    whole = evaluate_members([ternary_model], graph, chunk_atoms=None)
    chunked = evaluate_members([ternary_model], graph, chunk_atoms=7)
    assert torch.allclose(whole.energy, chunked.energy, atol=1e-10)
    assert torch.allclose(whole.forces, chunked.forces, atol=1e-10)
    assert torch.allclose(whole.stress, chunked.stress, atol=1e-12)


def test_float32_model_agrees_with_float64(ternary_model):
    atoms = ternary_cell(8)
    reference = predict(ternary_model, [atoms])
    single = Ensemble([copy.deepcopy(ternary_model)]).to(torch.float32)
    got = predict(single, [atoms])
    assert got.energy.dtype == torch.float64  # outputs follow the batch dtype
    assert float(got.energy[0]) == pytest.approx(float(reference.energy[0]), abs=1e-4 * len(atoms))
    assert torch.allclose(got.forces, reference.forces, atol=2e-4)


def test_open_boundaries_give_forces_without_stress(si_model):
    cluster = rattled(bulk("Si", "diamond", a=5.431, cubic=True), 2, strain=0.0)
    cluster.pbc = False
    pred = predict(si_model, [cluster])
    assert torch.isfinite(pred.forces).all()
    assert torch.allclose(pred.forces.sum(0), torch.zeros(3, dtype=pred.forces.dtype), atol=1e-10)
    assert torch.isnan(pred.stress).all()
