"""Which pool structures the active search validates with the oracle (seed 004 II.G, III.B)."""

from types import SimpleNamespace

import numpy as np
import pytest
from ase.build import bulk
from ase.io import read

from xtalforge.config import RunConfig, from_dict
from xtalforge.search.active import _validation_model, validation_tasks
from xtalforge.search.pools import SEARCH, TRAINING, Pool
from xtalforge.search.validation import uses_model_hessian


class _Ctx:
    def __init__(self, **active):
        self.config = from_dict(RunConfig, {"composition": "Si8", "active": active})


@pytest.fixture
def pool(reference_dir):
    diamond = read(reference_dir / "Si_diamond_Fd-3m.cif")
    rattled = diamond.copy()
    rattled.rattle(0.01, seed=1)
    rotated = diamond.copy()
    rotated.set_cell(diamond.cell[[1, 2, 0]] * 1.02, scale_atoms=False)
    rotated.positions = diamond.positions[:, [1, 2, 0]] * 1.02
    lonsdaleite = read(reference_dir / "Si_lonsdaleite_P63mmc.cif").repeat((1, 1, 2))
    beta_tin = read(reference_dir / "Si_beta-tin_I41amd.cif").repeat((1, 1, 2))
    simple_cubic = bulk("Si", "sc", a=2.5).repeat(2)
    training_low = diamond.copy()
    training_low.rattle(0.2, seed=2)
    atoms = [diamond, rattled, rotated, lonsdaleite, beta_tin, simple_cubic, training_low]
    n = len(atoms)
    return Pool(
        atoms=atoms, origin=np.array([SEARCH] * 6 + [TRAINING]), candidate=np.arange(n),
        initial_spacegroup=np.zeros(n, int), status=np.full(n, "converged", dtype="U16"), n_steps=np.zeros(n, int),
        energy_per_atom=np.array([-4.33, -4.32, -4.31, -4.30, -4.20, -4.25, -4.50]),
        max_force=np.zeros(n), uncertainty=np.zeros(n), cluster=np.array([0, 0, 1, 0, 2, -1, 3]),
    )


def test_distinct_clusters_merged_members_and_outsiders(pool):
    tasks = validation_tasks(_Ctx(stop_k=2, validate_lowest=6), pool)
    assert [(t.key, t.reason) for t in tasks] == [
        (0, "cluster"),  # lowest cluster
        (3, "merged cluster"),  # lonsdaleite hides in the diamond cluster
        (5, "outside clusters"),  # low noise point
        (4, "cluster"),  # cluster 1 is diamond again: the next distinct cluster is taken instead
    ]
    assert tasks[0].predicted_energy_per_atom == pytest.approx(-4.33) and tasks[0].info["cluster_rank"] == 1
    assert all(t.key != 6 for t in tasks)  # the training pool is not searched by default


def test_options_change_what_is_validated(pool):
    assert [t.key for t in validation_tasks(_Ctx(stop_k=1, merge_window=0.0), pool)] == [0]
    assert [t.key for t in validation_tasks(_Ctx(stop_k=1, merge_window=0.0, validate_lowest=5), pool)] == [0, 5]
    # Ten minima asked for, four distinct ones in the pool: each validated once.
    assert sorted(t.key for t in validation_tasks(_Ctx(stop_k=10), pool)) == [0, 3, 4, 5]
    with_training = validation_tasks(_Ctx(stop_k=1, merge_window=0.0, stop_include_training=True), pool)
    assert [t.key for t in with_training] == [6]


def test_the_lowest_structures_may_come_from_the_training_pool_too(pool):
    ctx = _Ctx(stop_k=1, merge_window=0.0, validate_lowest=1, validate_lowest_from="all")
    # The fixture's lowest training structure is a rattled diamond: the same crystal as the chosen cluster minimum.
    assert [t.key for t in validation_tasks(ctx, pool)] == [0]
    pool.atoms[6] = pool.atoms[4].copy()  # beta-tin, lowest of the whole pool
    assert [(t.key, t.reason) for t in validation_tasks(ctx, pool)] == [(6, "outside clusters"), (0, "cluster")]
    assert [t.key for t in validation_tasks(_Ctx(stop_k=1, merge_window=0.0, validate_lowest=1), pool)] == [0]


def test_near_degenerate_minima_are_validated_wherever_they_lie(pool):
    # Lonsdaleite, 30 meV/atom above diamond in diamond's own cluster, is validated when the window
    # reaches it; the rattled and rotated diamonds inside the window are the same crystal as the minimum.
    narrow = _Ctx(stop_k=1, merge_window=0.0, degenerate_window=0.02)
    assert [t.key for t in validation_tasks(narrow, pool)] == [0]
    wide = validation_tasks(_Ctx(stop_k=1, merge_window=0.0, degenerate_window=0.035), pool)
    assert [(t.key, t.reason) for t in wide] == [(0, "cluster"), (3, "near-degenerate")]
    # At most stop_k near-degenerate structures join: lonsdaleite, then simple cubic (noise, 80 meV/atom up).
    widest = validation_tasks(_Ctx(stop_k=1, merge_window=0.0, validate_lowest=0, degenerate_window=0.2), pool)
    assert [(t.key, t.reason) for t in widest] == [(0, "cluster"), (3, "near-degenerate")]
    two = validation_tasks(_Ctx(stop_k=2, merge_window=0.0, validate_lowest=0, degenerate_window=0.2), pool)
    assert [(t.key, t.reason) for t in two] == [(0, "cluster"), (3, "near-degenerate"), (5, "near-degenerate"), (4, "cluster")]


def test_energy_windows_must_not_be_negative(pool):
    from xtalforge.errors import ConfigError

    with pytest.raises(ConfigError, match="degenerate_window"):
        validation_tasks(_Ctx(degenerate_window=-0.01), pool)


@pytest.mark.parametrize(("hessian", "optimizer", "uses"),
                         [("model", "BFGS", True), ("identity", "BFGS", False), ("model", "FIRE", False)])
def test_the_ensemble_is_loaded_for_validation_only_when_its_hessian_is_used(hessian, optimizer, uses):
    relax = from_dict(RunConfig, {"composition": "Si8", "relax": {
        "validation_hessian": hessian, "validation_optimizer": optimizer}}).relax
    assert uses_model_hessian(relax) is uses
    if not uses:  # returns before it looks for the cycle's model file (state is not needed)
        assert _validation_model(SimpleNamespace(config=SimpleNamespace(relax=relax)), state=None) is None
