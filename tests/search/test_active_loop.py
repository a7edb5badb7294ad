"""The active-learning loop with a stand-in model: labels, bookkeeping, validation, resume.

The stand-in "ensemble" predicts Stillinger-Weber energies (the oracle's own), a
relative uncertainty that shrinks as the training set grows and compact distance
features. That isolates the loop from NNP training, so these tests check the search
logic exactly and fast; tests/search/test_active_search.py runs the real ensemble.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xtalforge.config import RunConfig, from_dict
from xtalforge.oracles import Oracle
from xtalforge.oracles.registry import build_calculator
from xtalforge.search import active, run_search
from xtalforge.search.pools import SEARCH, TRAINING, Pool
from xtalforge.search.selection import noise_level
from xtalforge.store import RunStore
from xtalforge.structures.batch import Prediction

BATCH = 4


class StandIn:
    """Stillinger-Weber predictions; U = 2 / (1 + frames / 4); mean-pooled Gaussian distance features."""

    def __init__(self, n_frames: int):
        self.n_frames = n_frames
        self.calc = build_calculator("sw")
        self.metrics = {"energy_rmse": 0.0, "forces_rmse": 0.0, "n_train": n_frames}

    def predict(self, batch, stress=True, features=False):
        energy, forces, stresses, feats = [], [], [], []
        for atoms in batch.to_atoms():
            atoms.calc = self.calc
            energy.append(atoms.get_potential_energy())
            forces.append(atoms.get_forces())
            stresses.append(atoms.get_stress(voigt=False))
            d = np.sort(atoms.get_all_distances(mic=True), axis=1)[:, 1:5]
            feats.append(np.exp(-((d.mean(1)[:, None] - np.array([2.2, 2.5, 2.8, 3.1])) ** 2) / 0.05).mean(0))
        t = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float64)
        return Prediction(energy=t(energy), forces=t(np.concatenate(forces)), stress=t(stresses) if stress else None,
                          uncertainty=torch.full((batch.n_systems,), 2.0 / (1 + self.n_frames / 4), dtype=torch.float64),
                          features=t(feats) if features else None)

    def save(self, path):
        Path(path).write_text(json.dumps({"n_frames": self.n_frames}))


@pytest.fixture
def stand_in(monkeypatch):
    """Replace training and model loading; remember the training-set size of each cycle."""
    trained = {}

    def train(ctx, frames, cycle):
        assert all(np.isfinite(f.get_potential_energy()) for f in frames)
        trained[cycle] = len(frames)
        return StandIn(len(frames))

    monkeypatch.setattr(active, "train_models", train)
    monkeypatch.setattr(active, "load_models", lambda path: StandIn(json.loads(Path(path).read_text())["n_frames"]))
    return trained


def _config(reference_dir, **active_settings):
    data = {
        "composition": "Si8", "seed": 1,
        "oracle": {"name": "sw"},
        "structures": {"min_distances": {"Si-Si": 1.9}, "lattice_min": 3.0},
        "relax": {"max_steps": 40, "patience": 10},
        "search": {"method": "active", "target": str(reference_dir / "Si_diamond_Fd-3m.cif")},
        "active": {"spacegroups": [227, 141, 194, 12], "per_spacegroup": 3, "training_pool_size": 10,
                   "batch_size": BATCH, "max_cycles": 3, "stop_k": 2, **active_settings},
    }
    return from_dict(RunConfig, data)


class InterruptingSW(Oracle):
    """The sw oracle, interrupted (as by Ctrl-C or a kill) in its ``at``-th single point."""

    def __init__(self, at: int):
        inner = build_calculator("sw")
        calculate = inner.calculate

        def interrupted(*args, **kwargs):
            if self.stats.calls == at:
                raise KeyboardInterrupt
            return calculate(*args, **kwargs)

        inner.calculate = interrupted
        super().__init__("sw", inner)


def _labels(store):
    return [(r.generation, r.candidate, round(r.energy_per_atom or 0.0, 8), r.extra["label_index"])
            for r in store.records(stage="label")]


def test_loop_labels_trains_relaxes_and_validates(tmp_path, reference_dir, stand_in):
    config = _config(reference_dir, label_from="training")
    summary = run_search(config, tmp_path / "run", progress=False)
    store = RunStore(tmp_path / "run")
    cycles = json.loads((tmp_path / "run" / "cycles.json").read_text())
    n_cycles = len(cycles["cycles"])
    assert 1 <= n_cycles <= 3 and cycles["stopped"]

    labels = store.records(stage="label")
    assert len(labels) == BATCH * n_cycles and all(r.oracle_calls == 1 for r in labels)
    pool0 = Pool.load(tmp_path / "run" / "active" / "pool_000.npz")
    assert all(pool0.origin[r.candidate] == TRAINING for r in labels)  # labels come from the training pool
    for r in labels:
        assert r.extra["noise"] == pytest.approx(noise_level(r.generation, 0.4, 0.6))
        assert r.relaxed.get_forces().shape == (8, 3)  # the label itself is stored
    accepted = [sum(1 for r in labels if r.status == "ok" and r.generation <= c) for c in range(1, n_cycles + 1)]
    assert [stand_in[c] for c in range(1, n_cycles + 1)] == accepted  # every accepted label trains, cumulatively

    validation = store.records(stage="validation")
    assert validation and all(r.extra["reason"] in ("cluster", "merged cluster", "outside clusters") for r in validation)
    # BFGS started from the Hessian of the model that proposed them (relax.validation_hessian).
    assert all(r.extra["start_hessian"] == "model" for r in validation if r.status == "ok")
    assert summary["target_found"] is True and summary["best"]["spacegroup"].startswith("Fd-3m")
    assert summary["oracle_calls_to_target"] <= summary["oracle_calls"]
    # Every oracle single point is in the store: labels one each, validations their steps.
    assert sum(r.oracle_calls for r in store.records()) == summary["oracle_calls"]
    assert summary["oracle_calls"] == len(labels) + sum(r.oracle_calls for r in validation)
    assert cycles["validation"] and cycles["validation"][0]["energy_per_atom"] == pytest.approx(summary["best"]["energy_per_atom"])
    for c in cycles["cycles"]:
        assert c["lowest_clusters"] and c["n_selected"] == BATCH and c["oracle_calls_total"] == BATCH * c["cycle"]
        assert sum(c["relax_status"].values()) == len(pool0)
    for cycle in range(1, n_cycles + 1):
        assert (tmp_path / "run" / "active" / f"cycle_{cycle:03d}" / "pool.npz").exists()


@pytest.mark.slow
def test_first_cycle_labels_the_training_pool_later_cycles_any_pool(tmp_path, reference_dir, stand_in):
    config = _config(reference_dir, label_from="all", max_cycles=3, stop_tol=-1.0, validate=False, force_weight=0.0)
    run_search(config, tmp_path / "run", progress=False)
    labels = RunStore(tmp_path / "run").records(stage="label")
    pool0 = Pool.load(tmp_path / "run" / "active" / "pool_000.npz")
    origins = {cycle: {int(pool0.origin[r.candidate]) for r in labels if r.generation == cycle} for cycle in (1, 2, 3)}
    assert origins[1] == {TRAINING}  # seed 004 III.A: the first, random batch comes from the training pool
    assert any(SEARCH in origins[c] for c in (2, 3))  # then the selection score ranks both pools


def test_interrupted_runs_resume_without_repeating_oracle_work(tmp_path, reference_dir, stand_in, monkeypatch):
    config = _config(reference_dir, max_cycles=3, stop_tol=-1.0)  # never converges: exactly three cycles
    reference = run_search(config, tmp_path / "reference", progress=False)
    reference_labels = _labels(RunStore(tmp_path / "reference"))

    run_dir = tmp_path / "interrupted"
    # Killed in the middle of cycle 2's labels ...
    with pytest.raises(KeyboardInterrupt):
        run_search(config, run_dir, progress=False, oracle=InterruptingSW(at=BATCH + 3))
    assert len(RunStore(run_dir).records(stage="label")) == BATCH + 2
    # ... then between cycles (training of cycle 3 dies) ...
    train = active.train_models

    def dying_train(ctx, frames, cycle):
        if cycle == 3:
            raise KeyboardInterrupt
        return train(ctx, frames, cycle)

    monkeypatch.setattr(active, "train_models", dying_train)
    with pytest.raises(KeyboardInterrupt):
        run_search(config, run_dir, progress=False)
    state = json.loads((run_dir / "active" / "state.json").read_text())
    assert (state["cycle"], state["phase"]) == (3, "labelled")
    monkeypatch.setattr(active, "train_models", train)
    resumed = run_search(config, run_dir, progress=False)

    assert _labels(RunStore(run_dir)) == reference_labels  # same labels, none repeated
    assert resumed["oracle_calls"] == reference["oracle_calls"]
    assert sum(r.oracle_calls for r in RunStore(run_dir).records()) == resumed["oracle_calls"]
    a = json.loads((tmp_path / "reference" / "cycles.json").read_text())
    b = json.loads((run_dir / "cycles.json").read_text())
    assert [c["lowest_clusters"] for c in a["cycles"]] == [c["lowest_clusters"] for c in b["cycles"]]
    assert a["validation"] == b["validation"]
    assert resumed["best"]["energy_per_atom"] == pytest.approx(reference["best"]["energy_per_atom"])


def test_transfer_settings_and_config_errors(tmp_path, reference_dir, stand_in):
    from xtalforge.errors import ConfigError

    bad = _config(reference_dir, max_cycles=0)
    with pytest.raises(ConfigError, match="initial_models"):
        run_search(bad, tmp_path / "bad", progress=False)
    missing = _config(reference_dir, initial_dataset="nowhere.extxyz")
    with pytest.raises(ConfigError, match="not found"):
        run_search(missing, tmp_path / "missing", progress=False)
    with pytest.raises(ConfigError, match="generation_workers must be 0"):
        run_search(_config(reference_dir, generation_workers=-2), tmp_path / "workers", progress=False)

    # A training pool in a smaller cell: labels are Si4 cells, the search pool stays Si8.
    config = _config(reference_dir, max_cycles=1, training_formula_units=None)
    config.composition, config.formula_units = "Si2", 4
    config.active.training_formula_units = 2
    config.search.target = None
    run_search(config, tmp_path / "transfer", progress=False)
    pool = Pool.load(tmp_path / "transfer" / "active" / "pool_000.npz")
    sizes = {(int(o), len(a)) for o, a in zip(pool.origin, pool.atoms)}
    assert sizes == {(0, 8), (1, 4)}
    assert {len(r.relaxed) for r in RunStore(tmp_path / "transfer").records(stage="label")} == {4}


def test_starting_from_models_and_data_trained_elsewhere(tmp_path, reference_dir, stand_in):
    from ase.io import write

    from xtalforge.config import StructuresConfig
    from xtalforge.search.selection import (
        cluster_pool,
        pick_per_cluster,
        selection_scores,
    )
    from xtalforge.structures.constraints import Constraints
    from xtalforge.structures.generate import candidate_rng, generate_structure

    oracle = Oracle("sw", build_calculator("sw"))
    constraints = Constraints.from_config("Si8", StructuresConfig(min_distances={"Si-Si": 1.9}, lattice_min=3.0))
    frames = [oracle.single_point(a).to_atoms(a) for a in
              (generate_structure("Si8", constraints, candidate_rng(99, i), mode="random") for i in range(3))]
    write(tmp_path / "elsewhere.extxyz", frames)
    (tmp_path / "elsewhere.model").write_text(json.dumps({"n_frames": 40}))  # a confident stand-in

    config = _config(reference_dir, max_cycles=1, initial_models=str(tmp_path / "elsewhere.model"),
                     initial_dataset=str(tmp_path / "elsewhere.extxyz"))
    run_search(config, tmp_path / "run", progress=False)
    pool0 = Pool.load(tmp_path / "run" / "active" / "pool_000.npz")
    assert "initial" not in set(pool0.status) and np.isfinite(pool0.energy_per_atom).all()
    # With a model from the start, the first batch is chosen by score, not at random.
    labels = cluster_pool(pool0.features, 0.5, 2, valid=pool0.evaluated)
    scores = selection_scores(pool0.energy_per_atom, pool0.max_force, 0.5)
    best = pick_per_cluster(scores, labels, n=1, allowed=pool0.origin == TRAINING)[0]
    first = RunStore(tmp_path / "run").records(stage="label")[0]
    assert first.candidate == best and first.extra["noise"] == 0.0
    accepted = sum(r.status == "ok" for r in RunStore(tmp_path / "run").records(stage="label"))
    assert stand_in[1] == 3 + accepted  # the outside data trains every cycle

    # No cycles at all: the outside models relax the pool, the oracle only validates.
    only_models = _config(reference_dir, max_cycles=0, initial_models=str(tmp_path / "elsewhere.model"))
    summary = run_search(only_models, tmp_path / "models_only", progress=False)
    store = RunStore(tmp_path / "models_only")
    assert not store.records(stage="label") and store.records(stage="validation")
    assert summary["oracle_calls"] == sum(r.oracle_calls for r in store.records(stage="validation"))


def test_unconfirmed_validation_trains_on_its_relaxations_and_goes_on(tmp_path, reference_dir, stand_in):
    # stop_tol 1 eV/atom: the rule fires in every cycle with a previous pool (cycle 2 on);
    # confirm_tol 1e-6 eV/atom: no validation can be confirmed, so two rounds are run.
    config = _config(reference_dir, max_cycles=4, stop_tol=1.0, stop_k=1, stop_max_uncertain=1.0, confirm_tol=1e-6,
                     validation_rounds=2)
    config.search.stop_at_target = False
    summary = run_search(config, tmp_path / "run", progress=False)
    store = RunStore(tmp_path / "run")
    cycles = json.loads((tmp_path / "run" / "cycles.json").read_text())
    rounds = cycles["validation_rounds"]
    assert len(rounds) == 2 and rounds[0]["cycle"] == 2 and not rounds[0]["confirmed"]
    last = rounds[1]["cycle"]
    assert last > 2 and len(cycles["cycles"]) == last and cycles["stopped"]

    validation = store.records(stage="validation")
    assert {r.generation for r in validation} == {2, last}
    trajectories = sorted((tmp_path / "run" / "active" / "cycle_002" / "validation").glob("*.traj"))
    assert len(trajectories) == sum(r.generation == 2 for r in validation)
    # Cycle 3 trains on every accepted label plus the first round's oracle relaxations.
    labels = store.records(stage="label")
    accepted = {c: sum(r.status == "ok" and r.generation <= c for r in labels) for c in (2, 3)}
    extra = len(active.validation_frames(_context(config, tmp_path / "run"), active.ActiveState.load(tmp_path / "run"), 3))
    assert extra > 0 and stand_in[3] == accepted[3] + extra and stand_in[2] == accepted[2]
    # Every oracle call is counted: labels, and the steps of both validations.
    assert summary["oracle_calls"] == len(labels) + sum(r.oracle_calls for r in validation)
    assert len(cycles["validation"]) == len(validation)  # the table lists both rounds

    # A confirmed validation ends the search after one round.
    confirmed = _config(reference_dir, max_cycles=4, stop_tol=1.0, stop_k=1, stop_max_uncertain=1.0, confirm_tol=10.0)
    confirmed.search.stop_at_target = False
    run_search(confirmed, tmp_path / "confirmed", progress=False)
    rounds = json.loads((tmp_path / "confirmed" / "cycles.json").read_text())["validation_rounds"]
    assert len(rounds) == 1 and rounds[0]["confirmed"]


def _context(config, run_dir):
    from xtalforge.search.context import open_run

    return open_run(config, run_dir, progress=False)


def test_a_run_killed_in_its_second_validation_round_resumes(tmp_path, reference_dir, stand_in, monkeypatch):
    from xtalforge.search import validation

    config = _config(reference_dir, max_cycles=4, stop_tol=1.0, stop_k=1, stop_max_uncertain=1.0, confirm_tol=1e-6,
                     validation_rounds=2)
    config.search.stop_at_target = False
    reference = run_search(config, tmp_path / "reference", progress=False)
    a = json.loads((tmp_path / "reference" / "cycles.json").read_text())
    second = a["validation_rounds"][1]["cycle"]

    validate_one, seen = validation.validate_one, []

    def dying(ctx, task, **kwargs):
        if kwargs.get("generation") == second:
            seen.append(task.key)
            if len(seen) == 1:  # killed in the second round's first oracle relaxation
                raise KeyboardInterrupt
        return validate_one(ctx, task, **kwargs)

    monkeypatch.setattr(validation, "validate_one", dying)
    run_dir = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_search(config, run_dir, progress=False)
    state = json.loads((run_dir / "active" / "state.json").read_text())
    assert state["stopped"] and len(state["validation_rounds"]) == 1
    monkeypatch.setattr(validation, "validate_one", validate_one)
    resumed = run_search(config, run_dir, progress=False)
    assert resumed["oracle_calls"] == reference["oracle_calls"]
    b = json.loads((run_dir / "cycles.json").read_text())
    assert a["validation_rounds"] == b["validation_rounds"] and a["validation"] == b["validation"]


@pytest.mark.parametrize("relax_from", ["relaxed", "initial"])
def test_each_cycle_relaxes_from_the_chosen_start(tmp_path, reference_dir, stand_in, monkeypatch, relax_from):
    started_from = {}
    relax_pool = active.relax_pool

    def spy(model, pool, *args, **kwargs):
        started_from[len(started_from) + 1] = np.concatenate([a.positions for a in pool.atoms])
        return relax_pool(model, pool, *args, **kwargs)

    monkeypatch.setattr(active, "relax_pool", spy)
    config = _config(reference_dir, relax_from=relax_from, max_cycles=2, stop_tol=-1.0, validate=False, u_max=10.0)
    run_search(config, tmp_path / "run", progress=False)
    folder = tmp_path / "run" / "active"
    positions = lambda pool: np.concatenate([a.positions for a in Pool.load(pool).atoms])
    initial, after_first = positions(folder / "pool_000.npz"), positions(folder / "cycle_001" / "pool.npz")
    assert not np.allclose(initial, after_first)
    assert np.array_equal(started_from[1], initial)  # cycle 1 always relaxes the candidates
    assert np.array_equal(started_from[2], initial if relax_from == "initial" else after_first)
