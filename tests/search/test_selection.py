"""Selection score, clustering, per-cluster pick, noise schedule and stopping rule (seed 004 II.C–II.F)."""

import itertools

import numpy as np
import pytest
from ase.build import bulk

from xtalforge.search.selection import (
    NOISE,
    cluster_minima,
    cluster_pool,
    has_converged,
    noise_level,
    perturb,
    pick_per_cluster,
    selection_scores,
    stopping_improvement,
)


def test_score_rewards_low_energy_and_large_forces():
    energy = np.array([-4.0, -4.2, -4.0, np.nan])
    fmax = np.array([0.1, 0.1, 0.5, 0.1])
    score = selection_scores(energy, fmax, force_weight=0.5)
    assert score[1] > score[0]  # lower energy
    assert score[2] > score[0]  # larger force, same energy
    assert score[2] - score[0] == pytest.approx(0.5 * 0.4)
    assert score[3] == -np.inf
    assert np.allclose(selection_scores(energy[:3], fmax[:3], 0.0), -energy[:3])


def _blobs(rng, n_per=20):
    centres = np.array([[0.0, 0.0, 0.0], [10.0, 10.0, 10.0]])
    points = np.concatenate([c + 0.05 * rng.normal(size=(n_per, 3)) for c in centres])
    isolated = np.array([[5.0, -8.0, 6.0]])
    return np.concatenate([points, isolated])


def test_dbscan_finds_blobs_and_noise_invariant_to_feature_scale():
    rng = np.random.default_rng(0)
    features = _blobs(rng)
    labels = cluster_pool(features, eps=0.5, min_samples=2)
    assert len(set(labels[:20])) == 1 and len(set(labels[20:40])) == 1
    assert labels[0] != labels[20] and labels[0] != NOISE
    assert labels[-1] == NOISE
    # Standardisation: rescaling and shifting a feature column changes nothing.
    scaled = features * np.array([1000.0, 1e-3, 3.0]) + 7.0
    assert np.array_equal(cluster_pool(scaled, eps=0.5, min_samples=2), labels)


def test_dbscan_skips_invalid_and_extreme_rows():
    rng = np.random.default_rng(1)
    features = _blobs(rng)
    features = np.concatenate([features, [[np.nan, 0, 0], [1e9, 1e9, 1e9]]])
    valid = np.ones(len(features), bool)
    valid[0] = False
    labels = cluster_pool(features, valid=valid)
    assert labels[0] == NOISE and labels[-2] == NOISE and labels[-1] == NOISE
    # Without the extreme row dominating the scale, both blobs are still found.
    assert labels[1] != NOISE and labels[21] != NOISE and labels[1] != labels[21]


def test_pick_one_per_cluster_highest_score_first():
    scores = np.array([5.0, 9.0, 1.0, 8.0, 7.0, 6.0, -np.inf, 10.0])
    labels = np.array([0, 0, 1, 1, NOISE, NOISE, 2, 0])
    allowed = np.ones(8, bool)
    allowed[7] = False  # best overall but not selectable
    picked = pick_per_cluster(scores, labels, n=10, allowed=allowed)
    assert picked.tolist() == [1, 3, 4, 5]  # cluster 0 -> 1, cluster 1 -> 3, both noise points; -inf never
    assert pick_per_cluster(scores, labels, n=2, allowed=allowed).tolist() == [1, 3]
    picked_all = pick_per_cluster(scores, labels, n=10)
    assert picked_all.tolist() == [7, 3, 4, 5]
    assert len({labels[i] for i in picked_all if labels[i] != NOISE}) == 2


def test_noise_schedule():
    assert noise_level(1, 0.4, 0.6) == 0.0
    assert noise_level(1, 0.4, 0.6, first_cycle=True) == pytest.approx(0.4)
    assert noise_level(2, 0.4, 0.6) == pytest.approx(0.24)
    assert noise_level(4, 0.4, 0.6) == pytest.approx(0.4 * 0.6**3)
    levels = [noise_level(c, 0.4, 0.6) for c in range(2, 10)]
    assert all(a > b for a, b in itertools.pairwise(levels))


def test_perturb_has_requested_spread_and_respects_minimum_distances():
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(3)  # 216 atoms
    sigma = 0.05
    moved = perturb(atoms, sigma, np.random.default_rng(3))
    delta = moved.positions - atoms.positions
    assert delta.std() == pytest.approx(sigma, rel=0.1)
    assert abs(delta.mean()) < 0.01
    again = perturb(atoms, sigma, np.random.default_rng(3))
    assert np.array_equal(again.positions, moved.positions)  # seeded, reproducible
    assert np.array_equal(atoms.positions, bulk("Si", "diamond", a=5.43, cubic=True).repeat(3).positions)

    # With a 2.0 Å pair minimum a strong noise must be redrawn until every pair is above it.
    small = bulk("Si", "diamond", a=5.43, cubic=True)
    thresholds = np.full((len(small), len(small)), 2.0)
    for seed in range(5):
        out = perturb(small, 0.15, np.random.default_rng(seed), thresholds, max_tries=50)
        assert out is not None
        assert out.get_all_distances(mic=True)[np.triu_indices(len(out), 1)].min() >= 2.0
    # An impossible minimum gives None instead of an overlapping structure.
    assert perturb(small, 0.1, np.random.default_rng(0), np.full((8, 8), 3.0), max_tries=5) is None


def test_cluster_minima_and_stopping_rule():
    energy = np.array([-3.0, -3.5, -3.4, -4.0, -3.9, -5.0, -2.0])
    labels = np.array([0, 0, 1, 1, 2, NOISE, 2])
    minima = cluster_minima(energy, labels, k=2)
    assert minima.energies.tolist() == [-4.0, -3.9]  # noise point -5.0 is not a cluster
    assert minima.members.tolist() == [3, 4]
    assert cluster_minima(energy, labels, k=10).energies.tolist() == [-4.0, -3.9, -3.5]

    current = np.array([-4.0, -3.9, -3.5])
    assert stopping_improvement(current, current + 0.005) == pytest.approx(0.005)
    assert stopping_improvement(current, current - 0.5) < 0  # previous pool better: no improvement
    assert stopping_improvement(current, current[:2]) == np.inf
    assert has_converged(current, [current + 0.005], tol=0.01)
    assert not has_converged(current, [current + 0.005, current + np.array([0, 0.02, 0])], tol=0.01)
    assert not has_converged(current, [], tol=0.01)
