"""RDF fingerprint and Pearson distance (seed 001 eqs. 1-2): physics and invariances."""

import numpy as np
import pytest
from ase import Atoms
from ase.io import read
from ase.neighborlist import neighbor_list
from scipy.special import erf

from xtalforge.similarity import (
    element_pairs,
    pairwise_pearson,
    pearson_distance,
    rdf_batch,
    rdf_fingerprint,
)

CUTOFF, N_BINS = 8.0, 200
R = (np.arange(N_BINS) + 0.5) * CUTOFF / N_BINS  # bin centres


@pytest.fixture(scope="module")
def diamond(reference_dir):
    return read(reference_dir / "Si_diamond_Fd-3m.cif")


@pytest.fixture(scope="module")
def beta_tin(reference_dir):
    return read(reference_dir / "Si_beta-tin_I41amd.cif")


def test_first_peak_at_nearest_neighbour_distance_with_four_neighbours(diamond):
    a = diamond.cell.lengths()[0]
    nearest, second = a * np.sqrt(3) / 4, a / np.sqrt(2)  # 2.35 Å and 3.84 Å in diamond
    rdf = rdf_fingerprint(diamond)
    first_shell = R < 0.5 * (nearest + second)
    assert abs(R[first_shell][np.argmax(rdf[first_shell])] - nearest) <= CUTOFF / N_BINS
    assert abs(nearest - 2.35) < 0.01
    # n(r) counts neighbours per atom: 4 in the first shell, 12 in the second.
    assert rdf[first_shell].sum() == pytest.approx(4.0, abs=1e-6)
    second_shell = (R > 0.5 * (nearest + second)) & (R < 4.1)
    assert rdf[second_shell].sum() == pytest.approx(12.0, abs=1e-3)
    assert rdf[R < 2.0].max() < 1e-8  # nothing closer than a bond


def brute_force_rdf(distances, n_atoms, sigma):
    """Every Gaussian integrated over every bin (no windows, no neighbour-list tricks)."""
    edges = np.linspace(0, CUTOFF, N_BINS + 1)
    cdf = 0.5 * erf((edges[None, :] - distances[:, None]) / (np.sqrt(2) * sigma))
    return np.diff(cdf, axis=1).sum(axis=0) / n_atoms


def test_matches_brute_force_histogram_of_a_cluster(diamond):
    # Non-periodic: takes ASE's neighbour list path; compare with all pair distances.
    cluster = diamond.repeat(2)
    cluster.pbc = False
    d = np.linalg.norm(cluster.positions[:, None] - cluster.positions[None], axis=-1)
    d = d[~np.eye(len(cluster), dtype=bool)]
    np.testing.assert_allclose(rdf_fingerprint(cluster, sigma=0.1), brute_force_rdf(d, len(cluster), 0.1), atol=1e-12)


def test_matches_brute_force_histogram_of_a_periodic_crystal(beta_tin):
    # Periodic: vesin's half list; compare with ASE's full list of periodic images.
    rattled = beta_tin.copy()
    rattled.rattle(0.05, rng=np.random.default_rng(3))
    d = neighbor_list("d", rattled, CUTOFF + 1.0)
    np.testing.assert_allclose(rdf_fingerprint(rattled), brute_force_rdf(d, len(rattled), 0.06), atol=1e-12)


def test_invariant_under_permutation_translation_rotation_and_supercell(beta_tin):
    rng = np.random.default_rng(0)
    reference = rdf_fingerprint(beta_tin)
    shuffled = beta_tin[rng.permutation(len(beta_tin))]
    moved = beta_tin.copy()
    moved.translate(rng.normal(size=3))
    moved.wrap()
    rotated = beta_tin.copy()
    rotated.rotate(37, (1, 2, 3), rotate_cell=True)
    supercell = beta_tin.repeat((2, 1, 3))
    for other in (shuffled, moved, rotated, supercell):
        np.testing.assert_allclose(rdf_fingerprint(other), reference, atol=1e-9)


def test_pearson_distance_zero_for_identical_and_separates_polymorphs(diamond, beta_tin, reference_dir):
    lonsdaleite = read(reference_dir / "Si_lonsdaleite_P63mmc.cif")
    fd, fb, fl = (rdf_fingerprint(a) for a in (diamond, beta_tin, lonsdaleite))
    assert pearson_distance(fd, fd) == pytest.approx(0.0, abs=1e-12)
    assert pearson_distance(fd, rdf_fingerprint(diamond.repeat(2))) == pytest.approx(0.0, abs=1e-12)
    assert pearson_distance(fd, fb) > 0.3
    # Lonsdaleite shares diamond's first two shells: closer to diamond than beta-tin is.
    assert 0.0 < pearson_distance(fd, fl) < pearson_distance(fd, fb)
    assert pearson_distance(fd, fb) == pytest.approx(pearson_distance(fb, fd))
    # Pearson's r ignores scale and offset (unknown gains and offsets, seed 001).
    assert pearson_distance(fd, 3.0 * fd + 1.0) == pytest.approx(0.0, abs=1e-12)
    assert pearson_distance(fd, -fd) == pytest.approx(2.0)


def test_pairwise_pearson_equals_one_minus_corrcoef(diamond, beta_tin):
    rattled = diamond.repeat((1, 1, 2))
    rattled.rattle(0.05, rng=np.random.default_rng(1))
    x = rdf_batch([diamond, beta_tin, rattled])
    assert x.shape == (3, N_BINS)
    np.testing.assert_allclose(x[2], rdf_fingerprint(rattled))
    dist = pairwise_pearson(x)
    np.testing.assert_allclose(dist, 1.0 - np.corrcoef(x), atol=1e-12)
    np.testing.assert_allclose(dist, dist.T)
    np.testing.assert_allclose(pairwise_pearson(x[:1], x), dist[:1], atol=1e-12)
    assert dist[0, 1] == pytest.approx(pearson_distance(x[0], x[1]))


def test_constant_fingerprints_have_defined_distances():
    flat = np.zeros(N_BINS)
    peaked = np.exp(-((R - 3.0) ** 2))
    assert pearson_distance(flat, flat) == 0.0
    assert pearson_distance(flat, peaked) == 1.0
    # A lone atom in a big box has no neighbours within the cutoff.
    lone = Atoms("Si", cell=[20, 20, 20], pbc=True)
    assert not rdf_fingerprint(lone).any()


def test_partial_rdfs_sum_to_total_and_separate_pairs(reference_dir):
    gaas = read(reference_dir / "GaAs_zincblende_F-43m.cif")
    partial = rdf_fingerprint(gaas, partial=True).reshape(-1, N_BINS)
    assert element_pairs(gaas.numbers) == [(31, 31), (31, 33), (33, 33)]
    np.testing.assert_allclose(partial.sum(axis=0), rdf_fingerprint(gaas), atol=1e-12)
    nearest = gaas.cell.lengths()[0] * np.sqrt(3) / 4
    first_shell = np.abs(R - nearest) < 0.3
    # Zincblende: every nearest neighbour is of the other species.
    assert partial[1, first_shell].sum() == pytest.approx(4.0, abs=1e-3)
    assert partial[0, first_shell].sum() < 1e-6 and partial[2, first_shell].sum() < 1e-6
    # A fixed element list gives one layout for structures of different compositions.
    si = read(reference_dir / "Si_diamond_Fd-3m.cif")
    batch = rdf_batch([gaas, si], partial=True)
    assert batch.shape == (2, len(element_pairs([14, 31, 33])) * N_BINS)
    with pytest.raises(ValueError, match="not in the given elements"):
        rdf_fingerprint(si, partial=True, elements=[31, 33])
