"""Random-search baseline: oracle calls until diamond Si is found (Si8, Si16; sw, sevennet).

These numbers are the yardstick later search methods must beat. Each run is a real
`run_search` with the target set; the figure is `oracle_calls_to_target`.

    python benchmarks/random_search.py                     # full: sw+sevennet, Si8+Si16, 3 seeds
    python benchmarks/random_search.py --oracles sw --sizes 8 --seeds 0
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REFERENCE_DIR, finish  # noqa: E402

from xtalforge.config import OracleConfig, RunConfig, SearchConfig, StructuresConfig  # noqa: E402
from xtalforge.search import run_search  # noqa: E402


def one_run(oracle: str, n_atoms: int, seed: int, budget: int, mode: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = RunConfig(
            composition=f"Si{n_atoms}",
            seed=seed,
            oracle=OracleConfig(name=oracle),
            structures=StructuresConfig(mode=mode),
            search=SearchConfig(method="random", max_oracle_calls=budget,
                                target=str(REFERENCE_DIR / "Si_diamond_Fd-3m.cif")),
        )
        start = time.perf_counter()
        summary = run_search(config, Path(tmp) / "run", progress=False)
        return {
            "oracle": oracle, "composition": f"Si{n_atoms}", "seed": seed, "mode": mode,
            "found": bool(summary["target_found"]),
            "oracle_calls_to_target": summary["oracle_calls_to_target"],
            "oracle_calls": summary["oracle_calls"], "n_candidates": summary["n_candidates"],
            "wall_time_s": round(time.perf_counter() - start, 1),
        }


def aggregate(runs: list[dict]) -> dict:
    calls = [r["oracle_calls_to_target"] for r in runs if r["found"]]
    return {
        "found": f"{len(calls)}/{len(runs)}",
        "median_calls": statistics.median(calls) if calls else None,
        "min_calls": min(calls) if calls else None,
        "max_calls": max(calls) if calls else None,
        "median_wall_s": statistics.median(r["wall_time_s"] for r in runs),
    }


def main() -> None:
    import torch

    torch.set_num_threads(1)  # one relaxation at a time: a second thread only spin-waits
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--oracles", default="sw,sevennet")
    parser.add_argument("--sizes", default="8,16")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--mode", default="symmetric", choices=["symmetric", "random"])
    parser.add_argument("--budget", type=int, default=20000, help="oracle-call budget per run")
    args = parser.parse_args()
    runs, table = [], {}
    for oracle in args.oracles.split(","):
        for n in map(int, args.sizes.split(",")):
            group = []
            for seed in map(int, args.seeds.split(",")):
                run = one_run(oracle, n, seed, args.budget, args.mode)
                print(f"{oracle:9s} Si{n:<3d} seed {seed}: found={run['found']} calls_to_target={run['oracle_calls_to_target']} "
                      f"candidates={run['n_candidates']} {run['wall_time_s']} s", flush=True)
                group.append(run)
            table[f"{oracle}/Si{n}"] = aggregate(group)
            runs.extend(group)
    print("\nsystem          found  median  range           wall(s)")
    for key, row in table.items():
        print(f"{key:15s} {row['found']:5s}  {row['median_calls']!s:6s}  {row['min_calls']!s}-{row['max_calls']!s:10s} {row['median_wall_s']}")
    finish("random_search", {"mode": args.mode, "budget": args.budget, "summary": table, "runs": runs})


if __name__ == "__main__":
    main()
