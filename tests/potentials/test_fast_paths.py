"""The fast evaluation paths agree with their plain definitions.

Per-element slot widths, stacked member networks (cached between calls), the monomial
block, the hand-written backward pass and the analytic slot gradients each replace a simpler
computation; these tests pin them to it.
"""

import copy

import numpy as np
import pytest
import torch
from ase.build import bulk
from nnp_helpers import rattled, ternary_cell, untrained_model

from xtalforge.potentials import Ensemble
from xtalforge.potentials.descriptors import NeighbourGraph, neighbour_pairs
from xtalforge.potentials.model import ElementNetwork, evaluate_members
from xtalforge.structures.batch import Batch


def test_slots_are_grouped_by_element_with_their_own_widths(ternary_model):
    atoms = ternary_cell(3)
    graph = ternary_model.graph(Batch.from_atoms([atoms]))
    i, j, _ = neighbour_pairs(atoms.positions, atoms.cell[:], atoms.pbc, ternary_model.descriptor.cutoff)
    element = graph.element.numpy()
    counts = np.zeros((len(atoms), 3), dtype=int)
    np.add.at(counts, (i, element[j]), 1)
    assert graph.widths == tuple(int(w) for w in counts.max(axis=0))  # C, Si, Ge groups: unequal widths
    assert np.array_equal(graph.n_slots.numpy(), counts)
    valid = graph.valid()
    slot_element = graph.slot_element()
    for e in range(3):  # every real neighbour sits in its element's group, every pair once
        in_group = valid[:, slot_element == e]
        assert np.array_equal(in_group.sum(1).numpy(), counts[:, e])
        assert torch.all(graph.element[graph.neighbour[:, slot_element == e][in_group]] == e)


def test_stacked_networks_equal_each_member_on_its_own(ternary_model):
    members = [ternary_model, untrained_model(["C", "Si", "Ge"], [ternary_cell(k) for k in range(4)], seed=7)]
    graph = ternary_model.graph(Batch.from_atoms([ternary_cell(5), ternary_cell(6)]))
    features = ternary_model.descriptor.features(graph)
    groups, inverse = graph.atoms_by_element(3)
    with torch.no_grad():
        together = evaluate_members(members, graph, forces=False, stress=False, hidden=True)
    for k, member in enumerate(members):
        energies, hidden = member.atomic_outputs(features, groups, inverse)
        assert torch.allclose(together.atomic_energies[k], energies, atol=1e-10)
        assert torch.allclose(together.hidden[k], hidden, atol=1e-10)


def test_cached_and_differentiable_paths_agree_and_the_cache_follows_the_weights(ternary_model):
    members = [copy.deepcopy(ternary_model) for _ in range(2)]
    graph = ternary_model.graph(Batch.from_atoms([ternary_cell(4)]))
    with torch.no_grad():
        cached = evaluate_members(members, graph)
    live = evaluate_members(members, graph)  # gradients on: stacks rebuilt with a graph to the weights
    assert live.energy.requires_grad
    for name in ("energy", "forces", "stress"):
        assert torch.allclose(getattr(cached, name), getattr(live, name).detach(), atol=1e-10)
    with torch.no_grad():
        members[1].networks[1].output.bias += 1.0  # an in-place change, as an optimizer step makes
        changed = evaluate_members(members, graph)
    n_si = int((graph.element == 1).sum())
    assert torch.allclose(changed.energy[1] - cached.energy[1], torch.tensor([float(n_si)], dtype=torch.float64))
    assert torch.allclose(changed.energy[0], cached.energy[0])


def test_monomial_block_equals_the_plain_monomials(si_model):
    sf = si_model.descriptor
    graph = si_model.graph(Batch.from_atoms([bulk("Si", "diamond", a=5.431, cubic=True)]))
    basis = sf.pair_basis(graph.vec, graph.segments)
    plain = sf.monomials(basis.u.transpose(0, 1))
    assert torch.equal(basis.monomials, plain)
    assert basis.monomials.is_contiguous()
    assert torch.equal(basis.low, plain[:, :sf.n_low_monomials])


def test_analytic_slot_gradients_equal_autograd(ternary_model):
    """dE/dvec from the moment gradients equals autograd through the features, for 2 members."""
    members = [ternary_model, untrained_model(["C", "Si", "Ge"], [ternary_cell(k) for k in range(4)], seed=9)]
    sf = ternary_model.descriptor
    graph = ternary_model.graph(Batch.from_atoms([ternary_cell(2)]))
    with torch.no_grad():
        out = evaluate_members(members, graph, stress=False, chunk_atoms=None)
    vec = graph.vec.clone().requires_grad_(True)
    basis = sf.pair_basis(vec, graph.segments)
    features = sf.features_from_moments(sf.moments(basis))
    groups, inverse = graph.atoms_by_element(3)
    for k, member in enumerate(members):
        grad = torch.autograd.grad(member.atomic_outputs(features, groups, inverse)[0].sum(), vec, retain_graph=True)[0]
        own = grad.sum(1)
        neighbour = torch.zeros_like(own).index_add(0, graph.neighbour.reshape(-1), grad.reshape(-1, 3))
        assert torch.allclose(out.forces[k], own - neighbour, atol=1e-9)


def test_ensemble_prediction_is_unchanged_by_a_previous_call_on_other_structures(ternary_model):
    ensemble = Ensemble([ternary_model, copy.deepcopy(ternary_model)])
    first = ensemble.predict(Batch.from_atoms([ternary_cell(1)]))
    ensemble.predict(Batch.from_atoms([ternary_cell(k) for k in range(5)]))
    again = ensemble.predict(Batch.from_atoms([ternary_cell(1)]))
    assert torch.equal(first.forces, again.forces) and torch.equal(first.energy, again.energy)


@pytest.mark.parametrize("activation", ["silu", "tanh", "sigmoid", "softplus"])
@pytest.mark.parametrize("system", ["si", "ternary"])
def test_hand_written_backward_equals_autograd(activation, system):
    """Prediction (no autograd graph) backpropagates through the networks and the quadratic
    features by hand; training differentiates the same energy with autograd."""
    if system == "si":
        elements, cells = ["Si"], [rattled(bulk("Si", "diamond", a=5.431, cubic=True), k) for k in range(3)]
    else:
        elements, cells = ["C", "Si", "Ge"], [ternary_cell(k) for k in range(3)]
    members = []
    for seed in range(2):
        model = untrained_model(elements, cells, seed=seed)
        model.networks = torch.nn.ModuleList(
            ElementNetwork(model.n_features, [12, 7], activation, torch.Generator().manual_seed(seed + k))
            for k in range(len(elements))
        )
        members.append(model)
    graph = members[0].graph(Batch.from_atoms(cells[:2]))
    with torch.no_grad():
        by_hand = evaluate_members(members, graph)
    with torch.enable_grad():
        by_autograd = evaluate_members(members, graph)
    for name in ("energy", "forces", "stress"):
        assert torch.allclose(getattr(by_hand, name), getattr(by_autograd, name).detach(), rtol=1e-10, atol=1e-10)
    assert by_hand.forces.abs().max() > 1e-3  # not a vacuous comparison


def test_graph_of_a_batch_equals_the_graphs_of_its_structures(ternary_model):
    from ase import Atoms

    trimer = Atoms("CSiGe", positions=[[0, 0, 0], [1.9, 0, 0], [0.3, 2.1, 0.2]], pbc=False)
    structures = [ternary_cell(0), trimer, ternary_cell(1)]
    together = ternary_model.graph(Batch.from_atoms(structures))
    apart = NeighbourGraph.concat([ternary_model.graph(Batch.from_atoms([s])) for s in structures])
    assert together.segments == apart.segments
    assert torch.equal(together.vec, apart.vec)
    assert torch.equal(together.neighbour, apart.neighbour)
    assert torch.equal(together.n_slots, apart.n_slots)
    assert torch.equal(together.volume.isnan(), apart.volume.isnan())
