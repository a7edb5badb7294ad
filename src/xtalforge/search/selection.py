"""What the oracle sees next, and when to stop (seed 004, sections II.C, II.D and II.F).

Pure functions on arrays, independent of the model that produced them:

- :func:`selection_scores`: ``L = -Ē + ω_f · max|f̄|`` (eq. 2), with Ē per atom as in
  the authors' code, so one ω_f serves every cell size;
- :func:`cluster_pool`: DBSCAN on standardised mean-pooled learned features (eq. 1);
- :func:`pick_per_cluster`: the highest-scoring structure of each cluster, then the
  best ``n`` of those (noise points count as clusters of their own);
- :func:`noise_level` and :func:`perturb`: Gaussian position noise damped per cycle
  (eqs. 3–4), redrawn until no pair is closer than its minimum distance;
- :func:`cluster_minima` and :func:`stopping_improvement`: energies of the lowest
  clusters and the largest improvement over earlier pools (the stopping rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import Atoms
from sklearn.cluster import DBSCAN
from sklearn.preprocessing import StandardScaler

NOISE = -1  # DBSCAN label of points in no cluster
# Features this many robust standard deviations from the median mark a broken
# structure (collapsed cell, potential hole), not a cluster member.
OUTLIER_Z = 100.0


def selection_scores(energy_per_atom: np.ndarray, max_force: np.ndarray, force_weight: float) -> np.ndarray:
    """Selection score L of eq. 2: low energy and large remaining forces score high.

    Non-finite inputs give ``-inf`` so such structures are never chosen.
    """
    energy = np.asarray(energy_per_atom, dtype=float)
    force = np.asarray(max_force, dtype=float)
    score = -energy + force_weight * force
    return np.where(np.isfinite(score), score, -np.inf)


def cluster_pool(features: np.ndarray, eps: float = 0.5, min_samples: int = 2, valid: np.ndarray | None = None) -> np.ndarray:
    """DBSCAN cluster label per structure (``NOISE`` = in no cluster), on standardised features.

    ``valid`` marks the rows to cluster (default: rows with finite features); the
    others get ``NOISE``. Rows with a feature more than ``OUTLIER_Z`` robust standard
    deviations (median absolute deviation) from the median are set aside as noise
    first: one broken structure would otherwise set the scale for all the others.
    """
    features = np.asarray(features, dtype=float)
    labels = np.full(len(features), NOISE, dtype=int)
    rows = np.all(np.isfinite(features), axis=1) if len(features) else np.zeros(0, bool)
    if valid is not None:
        rows &= np.asarray(valid, dtype=bool)
    idx = np.flatnonzero(rows)
    if len(idx):
        idx = idx[~_extreme_rows(features[idx])]
    if len(idx) < max(min_samples, 1):
        return labels
    scaled = StandardScaler().fit_transform(features[idx])
    labels[idx] = DBSCAN(eps=eps, min_samples=min_samples).fit_predict(scaled)
    return labels


def _extreme_rows(features: np.ndarray) -> np.ndarray:
    """Rows with a feature beyond ``OUTLIER_Z`` robust standard deviations of the median."""
    median = np.median(features, axis=0)
    deviation = np.abs(features - median)
    scale = 1.4826 * np.median(deviation, axis=0)
    # A feature constant for most rows has MAD 0: fall back to its standard deviation.
    scale = np.where(scale > 0, scale, features.std(axis=0))
    scale = np.where(scale > 0, scale, 1.0)
    return np.any(deviation / scale > OUTLIER_Z, axis=1)


def pick_per_cluster(scores: np.ndarray, labels: np.ndarray, n: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``n`` highest scores, at most one per cluster, best first.

    Each cluster is represented by its highest-scoring allowed member; every noise
    point is a cluster of its own. Structures with a score of ``-inf`` or not
    ``allowed`` are never picked.
    """
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels)
    ok = np.isfinite(scores)
    if allowed is not None:
        ok &= np.asarray(allowed, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    order = order[ok[order]]
    ordered_labels = labels[order]
    keep = ordered_labels == NOISE
    clustered = np.flatnonzero(~keep)
    # np.unique returns the first (= highest-scoring) position of each cluster label.
    _, first = np.unique(ordered_labels[clustered], return_index=True)
    keep[clustered[first]] = True
    return order[keep][:n]


def noise_level(cycle: int, noise: float, damping: float, first_cycle: bool = False) -> float:
    """Standard deviation ε_t = ε · ω_ε^t of the position noise in cycle ``cycle`` (1-based).

    t = cycle - 1. As in the authors' code the first cycle, whose structures are
    random anyway, gets no noise unless ``first_cycle``.
    """
    if cycle <= 1 and not first_cycle:
        return 0.0
    return float(noise * damping ** max(cycle - 1, 0))


def perturb(
    atoms: Atoms,
    sigma: float,
    rng: np.random.Generator,
    thresholds: np.ndarray | None = None,
    max_tries: int = 20,
) -> Atoms | None:
    """Copy of ``atoms`` with N(0, σ) added to every Cartesian coordinate (eq. 3).

    ``thresholds`` (N, N) are per-pair minimum distances; noise is redrawn until no
    pair (periodic images included) is closer, and None is returned when ``max_tries``
    draws all fail. σ = 0 returns an unperturbed copy (still checked).
    """
    from xtalforge.dynamics.guards import check_close_pairs

    for _ in range(max_tries if sigma > 0 else 1):
        moved = atoms.copy()
        moved.calc = None
        if sigma > 0:
            moved.positions = moved.positions + rng.normal(0.0, sigma, size=moved.positions.shape)
        if thresholds is None or check_close_pairs(moved, thresholds) is None:
            return moved
    return None


@dataclass
class ClusterMinima:
    """The lowest clusters of a pool: energy of each cluster's lowest member, ascending."""

    energies: np.ndarray  # (k,) eV/atom
    members: np.ndarray  # (k,) pool index of each cluster's lowest member
    labels: np.ndarray  # (k,) cluster label


def cluster_minima(energy_per_atom: np.ndarray, labels: np.ndarray, k: int, valid: np.ndarray | None = None) -> ClusterMinima:
    """The ``k`` clusters with the lowest minimum energy (noise points are not clusters)."""
    energy = np.asarray(energy_per_atom, dtype=float)
    labels = np.asarray(labels)
    ok = (labels != NOISE) & np.isfinite(energy)
    if valid is not None:
        ok &= np.asarray(valid, dtype=bool)
    idx = np.flatnonzero(ok)
    if len(idx) == 0:
        empty = np.zeros(0)
        return ClusterMinima(empty, empty.astype(int), empty.astype(int))
    order = idx[np.argsort(energy[idx], kind="stable")]
    _, first = np.unique(labels[order], return_index=True)
    lowest = order[np.sort(first)]  # first occurrence in energy order = each cluster's minimum
    lowest = lowest[:k]
    return ClusterMinima(energy[lowest], lowest, labels[lowest])


def stopping_improvement(current: np.ndarray, previous: np.ndarray) -> float:
    """Largest energy decrease of the l-th lowest cluster between two pools.

    Both pools are evaluated with the same (current) model. ``inf`` when the pools
    have different numbers of clusters or none, as in the authors' code: the
    comparison is then undefined and the search goes on.
    """
    current = np.asarray(current, dtype=float)
    previous = np.asarray(previous, dtype=float)
    if len(current) == 0 or len(current) != len(previous):
        return float("inf")
    return float(np.max(previous - current))


def has_converged(current: np.ndarray, previous_pools: list[np.ndarray], tol: float) -> bool:
    """Stopping rule of II.F: no earlier pool (of the last n_cycle) is better by more than ``tol``."""
    if not previous_pools:
        return False
    return all(stopping_improvement(current, previous) <= tol for previous in previous_pools)
