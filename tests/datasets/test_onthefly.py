"""On-the-fly sampling: an ensemble drives the melt–quench MD, the oracle labels only uncertain frames."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.io import read

from xtalforge.config import MeltQuenchConfig, OnTheFlyConfig, OracleConfig, PotentialConfig, from_dict
from xtalforge.datasets.meltquench import run_meltquench
from xtalforge.datasets.onthefly import OnTheFlyLabeller
from xtalforge.oracles import build_oracle
from xtalforge.structures.composition import Composition

# Si8 through every stage in about 300 MD steps.
TINY = {
    "n_atoms": 8, "superheat_ps": 0.1, "melt_search_start_K": 3000.0, "melt_search_min_K": 3000.0,
    "melt_search_ps": 0.1, "volume_ps": 0.04, "volume_max_iterations": 2, "liquid_ps": 0.1,
    "quench_rate_K_per_ps": 20000.0, "anneal_ps": 0.1, "checkpoint_every": 20,
}
ONTHEFLY = {"bootstrap_steps": 40, "bootstrap_stride": 2, "retrain_every": 8, "n_models": 2,
            "uncertainty_threshold": 0.3}
POTENTIAL = {"hidden_layers": [8, 8], "epochs": 40}


class Interrupted(Exception):
    pass


class InterruptingLabeller(OnTheFlyLabeller):
    """Stops the run (like a kill) at the ``stop_at``-th candidate, after at least one retraining."""

    def __init__(self, *args, stop_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_at = stop_at

    def frame(self, atoms, segment, step):
        frame = super().frame(atoms, segment, step)
        if self.counters["candidates"] >= self.stop_at:
            raise Interrupted
        return frame


def labeller(oracle, cls=OnTheFlyLabeller, **kwargs):
    return cls(oracle, from_dict(OnTheFlyConfig, ONTHEFLY), potential=from_dict(PotentialConfig, POTENTIAL),
               seed=1, progress=False, **kwargs)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    oracle = build_oracle(OracleConfig(name="sw"))
    return run_meltquench(Composition.parse("Si"), from_dict(MeltQuenchConfig, TINY), oracle,
                          tmp_path_factory.mktemp("plain"), seed=1)


@pytest.fixture(scope="module")
def onthefly(tmp_path_factory):
    oracle = build_oracle(OracleConfig(name="sw"))
    out = tmp_path_factory.mktemp("onthefly")
    result = run_meltquench(Composition.parse("Si"), from_dict(MeltQuenchConfig, TINY), oracle, out, seed=1,
                            labeller=labeller(oracle))
    return result, oracle


def test_oracle_is_called_for_fewer_frames_than_the_md_visits(onthefly, plain):
    result, oracle = onthefly
    report, counters = result.report, result.report["labeller"]
    assert report["oracle_calls"] == oracle.calls
    # Oracle calls: the bootstrap steps (plus the first force call), the lost steps and the
    # uncertain candidates; every other step ran on the ensemble.
    assert report["oracle_calls"] == (ONTHEFLY["bootstrap_steps"] + 1 + counters["lost_steps"]
                                      + counters["labelled_candidates"])
    assert counters["nnp_steps"] > 0.7 * report["md_steps"]
    # Candidates come every 20 fs, as the plain protocol's frames; fewer of them are labelled.
    assert counters["candidates"] > 0
    assert counters["labelled_candidates"] < counters["candidates"]
    # Far fewer oracle calls than the plain protocol, which labels every MD step.
    assert report["oracle_calls"] < 0.35 * plain.report["oracle_calls"]
    assert counters["ensembles_trained"] >= 2  # the bootstrap ensemble, then retraining


def test_dataset_holds_only_oracle_labels(onthefly):
    result, _ = onthefly
    frames = read(result.dataset_path, index=":")
    counters = result.report["labeller"]
    assert len(frames) == counters["training_frames"] == sum(result.report["n_frames"].values())
    assert len(frames) == counters["bootstrap_frames"] + counters["lost_steps"] + counters["labelled_candidates"]
    check = build_oracle(OracleConfig(name="sw"))
    for frame in frames[::7]:
        label = check.single_point(frame)
        assert frame.get_potential_energy() == pytest.approx(label.energy, abs=1e-5)
        assert np.allclose(frame.get_forces(), label.forces, atol=1e-5)
    # Labelled candidates were the uncertain ones.
    uncertain = [f.info["uncertainty"] for f in frames if f.info["uncertainty"] >= 0]
    assert uncertain and min(uncertain) > ONTHEFLY["uncertainty_threshold"]


def test_interrupted_run_resumes_with_its_ensemble(onthefly, tmp_path):
    oracle = build_oracle(OracleConfig(name="sw"))
    settings = from_dict(MeltQuenchConfig, TINY)
    with pytest.raises(Interrupted):
        run_meltquench(Composition.parse("Si"), settings, oracle, tmp_path, seed=1,
                       labeller=labeller(oracle, InterruptingLabeller, stop_at=8))
    models = sorted((tmp_path / "checkpoint" / "models").glob("ensemble_*.pt"))
    assert models, "no ensemble was saved before the interruption"
    resumed = labeller(build_oracle(OracleConfig(name="sw")))
    result = run_meltquench(Composition.parse("Si"), settings, resumed.oracle, tmp_path, seed=1, labeller=resumed)
    report = json.loads((tmp_path / "meltquench.json").read_text())
    counters = report["labeller"]
    # The resumed run started from the saved ensemble (no new bootstrap) and finished the schedule.
    assert counters["bootstrap_frames"] == ONTHEFLY["bootstrap_steps"] // ONTHEFLY["bootstrap_stride"]
    assert report["md_steps"] == onthefly[0].report["md_steps"]
    assert len(result.frames) == counters["training_frames"]
    assert report["oracle_calls"] < report["md_steps"] / 2


def test_a_plain_run_is_not_resumed_on_the_fly(plain):
    from xtalforge.errors import CheckpointError

    oracle = build_oracle(OracleConfig(name="sw"))
    with pytest.raises(CheckpointError, match="holds a plain run, not on-the-fly"):
        run_meltquench(Composition.parse("Si"), from_dict(MeltQuenchConfig, TINY), oracle, plain.out_dir, seed=1,
                       labeller=labeller(oracle))


def test_retraining_waits_for_growth_of_the_set():
    oracle = build_oracle(OracleConfig(name="sw"))
    settings = from_dict(OnTheFlyConfig, {**ONTHEFLY, "retrain_every": 8, "retrain_growth": 0.5})
    lab = OnTheFlyLabeller(oracle, settings)
    lab.training = [None] * 40  # contents unused: only the counts decide
    lab.counters["new_since_training"] = 8  # trained last on 32 frames: 8 new is only 25 % growth
    assert not lab.retrain_due()
    lab.training = [None] * 48
    lab.counters["new_since_training"] = 16  # 16 of 32: 50 %
    assert lab.retrain_due()
    lab.settings = from_dict(OnTheFlyConfig, {**ONTHEFLY, "retrain_every": 8})  # growth 0: every 8 new frames
    lab.counters["new_since_training"] = 8
    assert lab.retrain_due()
