"""Training on the descriptor cache: the same losses, and the same training, as recomputing it."""

import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator
from nnp_helpers import sw_frames, ternary_cell

from xtalforge.config import PotentialConfig
from xtalforge.potentials import train_ensemble, training
from xtalforge.potentials.training import (
    _cached_terms,
    _combine,
    _layout,
    _loss_terms,
    _member_from_template,
    _member_losses,
    _minibatch,
    descriptor_cache,
    prepare,
)


def _randomly_labelled(atoms, rng, forces=True, stress=True):
    atoms = atoms.copy()
    atoms.calc = SinglePointCalculator(
        atoms, energy=float(rng.normal(-4.0 * len(atoms), 1.0)),
        forces=rng.normal(0.0, 1.0, (len(atoms), 3)) if forces else None,
        stress=rng.normal(0.0, 0.01, 6) if stress else None,
    )
    return atoms


@pytest.mark.parametrize("angular", ["g5", "g4"])
def test_cached_losses_equal_the_models(angular):
    # three elements, frames of 16 and 12 atoms, one without stress and one without forces,
    # GDF weights, and a ZBL onset above the shortest distance so that ZBL acts
    rng = np.random.default_rng(0)
    cells = [ternary_cell(k) for k in range(5)] + [ternary_cell(7)[:12]]
    frames = [_randomly_labelled(a, rng, forces=k != 2, stress=k != 4) for k, a in enumerate(cells)]
    config = PotentialConfig(dtype="float64", angular=angular, hidden_layers=[6, 5], gdf_weighting=True,
                             force_outlier_sigma=None)
    template, data = prepare(frames, config)
    template.set_zbl_onset(template.zbl_onset + 0.4)
    cache = descriptor_cache(template, data, config)
    models = [_member_from_template(template, config, 0, k) for k in range(2)]
    batches = [[0, 2, 5, 3], [4, 1, 5]]
    cached = _cached_terms(models, cache, _layout(cache, batches))
    _member_losses(config, *cached).sum().backward()
    cached_grads = [[p.grad.clone() for p in m.networks.parameters()] for m in models]
    for k, (model, idx) in enumerate(zip(models, batches)):
        model.zero_grad()
        expected = _loss_terms(model, _minibatch(data, idx, torch.float64, "cpu"), create_graph=True)
        _combine(config, *expected).backward()
        values = [float(torch.as_tensor(t).detach()) for t in expected]
        assert [float(t[k].detach()) for t in cached] == pytest.approx(values, rel=1e-9, abs=1e-12)
        for got, param in zip(cached_grads[k], model.networks.parameters()):  # per member: its own loss only
            assert torch.allclose(got, param.grad, rtol=1e-8, atol=1e-12)


def test_training_on_the_cache_equals_recomputing_the_descriptor(monkeypatch):
    # float64, members that stop early at different epochs, GDF weights
    frames = sw_frames(seed=2, n_strained=24, n_md=8)
    config = PotentialConfig(dtype="float64", n_models=3, epochs=12, batch_size=5, hidden_layers=[8, 8], lr=2e-2,
                             patience=2, lr_patience=1, stop_at_targets=False, gdf_weighting=True)
    cached = train_ensemble(frames, config, seed=5, progress=False)
    monkeypatch.setattr(training, "CACHE_LIMIT_BYTES", 0)
    messages = []
    recomputed = train_ensemble(frames, config, seed=5, progress=False, log=messages.append)
    assert any("recomputed every training step" in m for m in messages)
    assert len({m.metrics["epochs"] for m in cached.members}) > 1  # the members stopped at different epochs
    for a, b in zip(cached.members, recomputed.members):
        for key in ("epochs", "best_epoch", "stop_reason"):
            assert a.metrics[key] == b.metrics[key], key
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.allclose(pa, pb, rtol=1e-7, atol=1e-9), name


def test_replicas_on_the_cache_equal_recomputing_the_descriptor(monkeypatch):
    frames = sw_frames(seed=3, n_strained=16, n_md=4)
    config = PotentialConfig(dtype="float64", n_models=3, ensemble="replica", epochs=4, batch_size=4,
                             hidden_layers=[8, 8], stop_at_targets=False)
    cached = train_ensemble(frames, config, seed=1, progress=False)
    monkeypatch.setattr(training, "CACHE_LIMIT_BYTES", 0)
    recomputed = train_ensemble(frames, config, seed=1, progress=False)
    for a, b in zip(cached.members[1:], recomputed.members[1:]):
        assert a.metrics["atomic_energy_rmse_mev"] == pytest.approx(b.metrics["atomic_energy_rmse_mev"], rel=1e-6)
    for a, b in zip(cached.members, recomputed.members):
        assert a.hidden_layers == b.hidden_layers
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.allclose(pa, pb, rtol=1e-7, atol=1e-9), name


def test_energy_only_evaluation_keeps_the_graph_to_the_weights():
    # replicas train on atomic energies alone: their loss must reach the weights
    from xtalforge.potentials.model import evaluate_members

    frames = sw_frames(seed=4, n_strained=4, n_md=0)
    template, data = prepare(frames, PotentialConfig(), log=lambda m: None)
    model = _member_from_template(template, PotentialConfig(), 0, 0)
    graph = _minibatch(data, [0, 1], model.dtype, model.device).graph
    assert evaluate_members([model], graph, forces=False, stress=False).atomic_energies.requires_grad
    with torch.no_grad():
        assert not evaluate_members([model], graph, forces=False, stress=False).atomic_energies.requires_grad
