"""Seconds to build the model Hessian that starts an oracle BFGS validation (relax.validation_hessian).

``model_hessian`` takes central differences of the model's forces in BFGS's coordinates: 2 × (3N + 9)
geometries. With the NNP ensemble it evaluates them all in batched model calls
(``NNPCalculator.calculate_many``); ``batched=False`` calls the calculator once per geometry, as
for any other ASE calculator. Both are timed side by side on the structures validation sees:
rattled diamond Si16 and the Si46 type-I clathrate (examples/), with an ensemble of the default
size (5 BPNNs, default symmetry functions and layers, float32, untrained: the cost does not depend
on the weights). Every figure is the best of ``--repeats`` calls; the two Hessians must agree.
``batched_model_calls_s`` is the model's share of the batched time; the rest is ASE's
``FrechetCellFilter`` turning each geometry's forces and stress into forces on its coordinates.

Usage: python benchmarks/model_hessian.py [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ase.build import bulk
from ase.io import read

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish

from xtalforge.config import PotentialConfig
from xtalforge.dynamics import model_hessian
from xtalforge.potentials import BPNN, Ensemble, NNPCalculator

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def structures() -> dict:
    si16 = bulk("Si", "diamond", a=5.431, cubic=True).repeat((2, 1, 1))
    si16.rattle(0.05, seed=1)
    clathrate = read(EXAMPLES / "Si46_clathrate_Pm-3n.cif")
    clathrate.rattle(0.05, seed=2)
    return {"Si16": si16, "Si46": clathrate}


def ensemble(n_models: int) -> NNPCalculator:
    members = [BPNN(["Si"], generator=torch.Generator().manual_seed(k)) for k in range(n_models)]
    return NNPCalculator(Ensemble(members).to(torch.float32))


def best_time(fn, repeats: int) -> tuple[float, object]:
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return min(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_models = PotentialConfig().n_models
    calc = ensemble(n_models)
    figures = {}
    for name, atoms in structures().items():
        batched_s, batched = best_time(lambda atoms=atoms: model_hessian(atoms, calc), args.repeats)
        single_s, single = best_time(lambda atoms=atoms: model_hessian(atoms, calc, batched=False), args.repeats)
        difference = float(np.max(np.abs(batched - single)))
        geometries = 2 * (3 * len(atoms) + 9)
        # The model's share of the batched time: the same number of structures in calculate_many alone.
        model_s, _ = best_time(lambda atoms=atoms: calc.calculate_many([atoms] * geometries), args.repeats)
        figures[name] = {"atoms": len(atoms), "geometries": geometries,
                         "batched_s": round(batched_s, 4), "per_geometry_s": round(single_s, 4),
                         "batched_model_calls_s": round(model_s, 4),
                         "speedup": round(single_s / batched_s, 2), "max_abs_difference_ev_a2": difference}
        print(f"{name}: {geometries} geometries, batched {batched_s:.3f} s (model {model_s:.3f} s), "
              f"one call each {single_s:.3f} s ({single_s / batched_s:.1f}x), max |ΔH| {difference:.2e} eV/Å²")
    finish("model_hessian", {"n_models": n_models, "torch_threads": args.threads, "repeats": args.repeats,
                             "dtype": "float32", **figures})


if __name__ == "__main__":
    main()
