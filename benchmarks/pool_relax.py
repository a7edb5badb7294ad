"""Structures per second relaxing a pool of Si16 candidates with a 5-model NNP ensemble.

The active-learning search relaxes pools of ~1000 random structures with the ensemble, one
``predict`` per FIRE step for all of them.  This compares
  * batched: ``xtalforge.dynamics.batched_relax`` over the whole pool (one call), against
  * per structure: ``relax_structure`` (ASE FIRE + FrechetCellFilter) with the same
    ensemble's ASE calculator, timed on a subset and extrapolated to the pool,
with the same stop criteria (fmax 0.05 eV/Å, 2 GPa, 300 steps, patience 20).  The batched
run is made twice: with the search's ``u_max=0.5`` (structures whose ensemble spread is too
large stop early as "uncertain": with a quickly trained ensemble that is most of them) and
without it, which is the like-for-like comparison with the ASE loop (it has no such stop).

The ensemble is trained quickly (few epochs) on Si16 structures labelled by the
Stillinger-Weber oracle: its accuracy does not matter here, only that relaxations behave
like real ones.  It is cached in ``results/pool_relax_model.pt`` (about 0.1 MB); delete it
to retrain.  Torch runs on 1 thread: the machine is shared, and 2 threads were 3-100×
slower under load.

Usage: python benchmarks/pool_relax.py [--pool 1000] [--loop-sample 50] [--retrain]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, finish

from xtalforge.config import (
    OracleConfig,
    PotentialConfig,
    RelaxConfig,
    StructuresConfig,
)
from xtalforge.dynamics import batched_relax, relax_structure
from xtalforge.oracles import build_oracle
from xtalforge.potentials import load_model, train_ensemble
from xtalforge.structures.composition import Composition
from xtalforge.structures.constraints import Constraints
from xtalforge.structures.generate import generate_many

MODEL_PATH = RESULTS / "pool_relax_model.pt"
THREADS = 1
STOP = {"fmax": 0.05, "smax_gpa": 2.0, "max_steps": 300, "patience": 20}


def si16_structures(n: int, seed: int):
    composition = Composition.parse("Si", formula_units=16)
    constraints = Constraints.from_config(composition, StructuresConfig())
    return generate_many(composition, constraints, n, seed, mode="symmetric", progress=False)


def training_frames(n_structures: int, seed: int) -> list:
    """Random Si16 cells, their rattled copies and short SW relaxation snapshots, labelled by SW."""
    oracle = build_oracle(OracleConfig(name="sw"))
    rng = np.random.default_rng(seed)
    frames = []
    for atoms in si16_structures(n_structures, seed):
        frames.append(atoms)
        for sigma in (0.05, 0.15):
            rattled = atoms.copy()
            rattled.positions += rng.normal(0.0, sigma, rattled.positions.shape)
            frames.append(rattled)
        relaxed = relax_structure(atoms, oracle.calculator, RelaxConfig(max_steps=30))
        frames.append(relaxed.atoms)
    labelled = [r.to_atoms(a) for a, r in zip(frames, oracle.label(frames)) if r.ok]
    print(f"training data: {len(labelled)} SW-labelled Si16 frames ({oracle.calls} oracle calls)")
    return labelled


def ensemble(retrain: bool):
    if MODEL_PATH.exists() and not retrain:
        return load_model(MODEL_PATH), 0.0
    start = time.perf_counter()
    frames = training_frames(40, seed=11)
    model = train_ensemble(frames, PotentialConfig(epochs=30, n_models=5, patience=30), seed=0, progress=False)
    seconds = time.perf_counter() - start
    model.save(MODEL_PATH)
    if MODEL_PATH.stat().st_size > 2_000_000:  # only small files belong in results/
        MODEL_PATH.unlink()
    return model, seconds


def summary(statuses, steps) -> dict:
    return {"statuses": dict(Counter(statuses)), "median_steps": float(statistics.median(steps)) if steps else None}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=1000)
    parser.add_argument("--loop-sample", type=int, default=50)
    parser.add_argument("--retrain", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)

    model, train_seconds = ensemble(args.retrain)
    print(f"ensemble: {len(model)} members{'' if not train_seconds else f', trained in {train_seconds:.0f} s'}")
    pool = si16_structures(args.pool, seed=2024)
    print(f"pool: {len(pool)} Si16 structures")

    runs = {}
    for label, u_max in (("batched_u_max_0.5", 0.5), ("batched_no_u_max", None)):
        start = time.perf_counter()
        results = batched_relax(model, pool, u_max=u_max, progress=False, **STOP)
        seconds = time.perf_counter() - start
        runs[label] = {"u_max": u_max, "seconds": seconds, "structures_per_s": len(pool) / seconds,
                       **summary([r.status for r in results], [r.n_steps for r in results]),
                       "on_loop_subset": summary([r.status for r in results[: args.loop_sample]],
                                                 [r.n_steps for r in results[: args.loop_sample]])}
        print(f"{label}: {len(pool)} structures in {seconds:.1f} s = {len(pool) / seconds:.2f} structures/s; "
              f"{runs[label]['statuses']}, median steps {runs[label]['median_steps']}")

    sample = pool[: args.loop_sample]
    calculator = model.calculator()
    config = RelaxConfig(**STOP)
    start = time.perf_counter()
    looped = [relax_structure(atoms, calculator, config) for atoms in sample]
    loop_seconds = time.perf_counter() - start
    loop_rate = len(sample) / loop_seconds
    loop_summary = summary([r.status for r in looped], [r.n_steps for r in looped])
    print(f"per-structure ASE loop: {len(sample)} structures in {loop_seconds:.1f} s = {loop_rate:.2f} structures/s "
          f"(timed on the first {len(sample)} of the pool; {len(pool)} would take ~{len(pool) / loop_rate:.0f} s); "
          f"{loop_summary['statuses']}, median steps {loop_summary['median_steps']}")
    speedup = runs["batched_no_u_max"]["structures_per_s"] / loop_rate
    speedup_u_max = runs["batched_u_max_0.5"]["structures_per_s"] / loop_rate
    print(f"speed-up of batched over the per-structure loop, same stop criteria (no u_max): {speedup:.1f}× "
          f"(goal >= 10×); with u_max=0.5 (stops uncertain structures early): {speedup_u_max:.1f}×")
    return finish("pool_relax", {
        "torch_threads": THREADS,
        "n_models": len(model),
        "structures": "Si16 from generate_many (symmetric mode)",
        "stop_criteria": STOP,
        "pool_size": len(pool),
        **runs,
        "per_structure_loop": {
            "timed_structures": len(sample),
            "seconds": loop_seconds,
            "structures_per_s": loop_rate,
            "extrapolated_pool_seconds": len(pool) / loop_rate,
            "note": f"timed on the first {len(sample)} structures of the pool and extrapolated",
            **loop_summary,
        },
        "speedup": speedup,
        "speedup_note": "batched without u_max (same stop criteria as the ASE loop) over the per-structure loop",
        "speedup_with_u_max_0.5": speedup_u_max,
        "speedup_goal": 10.0,
        "ensemble_training_seconds": train_seconds or None,
    })


if __name__ == "__main__":
    main()
