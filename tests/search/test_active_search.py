"""Active-learning search end to end with the real NNP ensemble and the Stillinger-Weber oracle.

A short Si8 run: small pools, a three-model ensemble of small networks trained for
100 epochs at most. It must find diamond and stop on its own convergence rule.
Constraints keep the random training structures near the density of solid Si (as
seed 004's Table I bounds do), so such small models learn enough in a few cycles.
"""

import json

import numpy as np
import pytest

from xtalforge.config import RunConfig, from_dict
from xtalforge.potentials import load
from xtalforge.report import write_report
from xtalforge.search import run_search
from xtalforge.search.pools import Pool
from xtalforge.similarity import matches
from xtalforge.store import RunStore


@pytest.mark.slow
def test_si8_finds_diamond_and_stops_on_its_own(tmp_path, reference_dir, si_diamond):
    config = from_dict(RunConfig, {
        "composition": "Si8", "seed": 0, "oracle": {"name": "sw"},
        "structures": {"min_distances": {"Si-Si": 2.1}, "lattice_min": 3.0, "volume_per_atom": [16.0, 24.0]},
        "search": {"method": "active", "target": str(reference_dir / "Si_diamond_Fd-3m.cif")},
        "active": {"spacegroups": [227, 141, 194, 12, 225, 2], "per_spacegroup": 4, "training_pool_size": 40,
                   "batch_size": 15, "max_cycles": 6, "stop_k": 3, "stop_tol": 0.02},
        "potential": {"n_models": 3, "hidden_layers": [15, 15], "epochs": 100, "patience": 25, "batch_size": 8},
    })
    run_dir = tmp_path / "run"
    summary = run_search(config, run_dir, progress=False)
    cycles = json.loads((run_dir / "cycles.json").read_text())

    assert cycles["stop_reason"].startswith("converged"), cycles["stop_reason"]
    n_cycles = len(cycles["cycles"])
    assert 2 <= n_cycles < 6 and cycles["cycles"][-1]["converged"]
    assert summary["target_found"] is True
    best = RunStore(run_dir).best(1)[0]
    assert best.stage == "validation" and matches(best.relaxed, si_diamond)
    assert best.energy_per_atom == pytest.approx(-4.3365, abs=2e-3)  # SW diamond

    store = RunStore(run_dir)
    assert sum(r.oracle_calls for r in store.records()) == summary["oracle_calls"]
    assert len(store.records(stage="label")) == 15 * n_cycles
    # The ensemble of each cycle is kept and loads; it learned something about Si.
    ensemble = load(run_dir / "active" / f"cycle_{n_cycles:03d}" / "model.pt").ensemble
    assert len(ensemble) == 3
    metrics = [c["training_metrics"]["force_rmse_ev_a"] for c in cycles["cycles"]]
    assert metrics[-1] < metrics[0]
    pool = Pool.load(run_dir / "active" / f"cycle_{n_cycles:03d}" / "pool.npz")
    assert np.isfinite(pool.energy_per_atom[pool.usable]).all() and pool.features.shape[1] == 15

    report = write_report(run_dir).read_text()
    assert "Active learning" in report and "Validated minima" in report
