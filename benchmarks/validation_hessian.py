"""Oracle calls of validation when BFGS starts from the ensemble's Hessian, replayed on stored active runs.

An active search hands validation structures its ensemble just relaxed. BFGS from ASE's
default Hessian (70 eV/Å² times the identity) spends its first oracle steps learning the
curvature; started from the ensemble's finite-difference Hessian
(``relax.validation_hessian = "model"``, :mod:`xtalforge.dynamics.hessian`) its first step is
close to a Newton step. This script replays the validation of finished active runs of
``benchmarks/search_efficiency.py`` (``--workdir``): for every validated structure, the
start the run validated (first frame of ``cycle_NNN/validation/KEY.traj``) is relaxed
with the run's oracle twice, from the identity and from the Hessian of that cycle's
ensemble (``cycle_NNN/model.pt``, the model that proposed it), in the run's task order.

Reported per run: oracle calls of the validation both ways (the identity replay must equal
the stored run, a check that the replay is exact), whether both end in the same minimum,
and the run's calls in all and to the target had it validated from the model Hessian
(labels are the run's own; to the target: up to the validation that matched it, later
validation rounds and the labels between them included).

    python benchmarks/validation_hessian.py --runs WORKDIR             # every *_active_s* run in it
    python benchmarks/validation_hessian.py --runs WORKDIR --limit 1   # one structure per run (smoke)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish
from ase.io import read

from xtalforge.config import load_config
from xtalforge.dynamics import relax_structure
from xtalforge.oracles.registry import build_calculator
from xtalforge.potentials import NNPCalculator, load
from xtalforge.similarity import matches, spacegroup
from xtalforge.store import RunStore

SAME_MINIMUM_MEV = 5.0  # meV/atom: same space group and this close counts as the same minimum


def replay_run(run_dir: Path, oracle, limit: int | None) -> dict:
    """Both validations of every structure ``run_dir`` validated, and the run's figures with each."""
    config = load_config(run_dir / "config.toml")
    target = read(config.search.target) if config.search.target else None
    records = sorted(RunStore(run_dir).records(stage="validation", method="active"), key=lambda r: r.row_id)
    records = records[:limit] if limit else records
    rows, models = [], {}
    for record in records:
        cycle_dir = run_dir / "active" / f"cycle_{record.generation:03d}"
        start = read(cycle_dir / "validation" / f"{record.candidate}.traj", 0)
        model = models.setdefault(cycle_dir, NNPCalculator(load(cycle_dir / "model.pt").ensemble))
        rows.append({"candidate": record.candidate, "stored_calls": record.oracle_calls,
                     "identity": _relax(start, oracle, config.relax, None, target),
                     "model": _relax(start, oracle, config.relax, model, target)})
    return {"run": run_dir.name, **_run_figures(run_dir, records, rows), "structures": rows}


def _relax(start, oracle, relax_config, model, target) -> dict:
    t0 = time.perf_counter()
    result = relax_structure(start, oracle, relax_config, validation=True, hessian_model=model)
    sg = spacegroup(result.atoms) if result.ok else None
    return {"calls": result.n_calls, "status": result.status, "hessian": result.hessian,
            "energy_per_atom": result.energy_per_atom, "spacegroup": sg.number if sg else None,
            "matches_target": bool(result.ok and target is not None and matches(result.atoms, target)),
            "seconds": round(time.perf_counter() - t0, 1)}


def _run_figures(run_dir: Path, records, rows) -> dict:
    """The run's oracle calls in all and to its target, as stored and with model-Hessian validation."""
    summary = json.loads((run_dir / "summary.json").read_text())
    before = records[0].oracle_calls_total - records[0].oracle_calls
    stored = sum(r["stored_calls"] for r in rows)
    model = sum(r["model"]["calls"] for r in rows)
    to_target = summary.get("oracle_calls_to_target")
    if to_target is not None and to_target > before:  # found in validation: where the replay matched it
        saved, to_target = 0, None
        for record, row in zip(records, rows, strict=True):
            saved += row["stored_calls"] - row["model"]["calls"]  # fewer calls in every validation so far
            if row["model"]["matches_target"]:
                to_target = record.oracle_calls_total - saved
                break
    return {
        "calls_before_validation": before,
        "validation_calls": {"stored": stored, "identity": sum(r["identity"]["calls"] for r in rows), "model": model},
        "calls_in_all": {"stored": summary["oracle_calls"], "model": summary["oracle_calls"] - stored + model},
        "calls_to_target": {"stored": summary.get("oracle_calls_to_target"), "model": to_target},
        "same_minimum": sum(_same(r["identity"], r["model"]) for r in rows),
    }


def _same(a: dict, b: dict) -> bool:
    if a["energy_per_atom"] is None or b["energy_per_atom"] is None:
        return False
    return a["spacegroup"] == b["spacegroup"] and abs(a["energy_per_atom"] - b["energy_per_atom"]) * 1000 <= SAME_MINIMUM_MEV


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="search_efficiency.py --workdir with finished active runs")
    parser.add_argument("--pattern", default="*_active_s*")
    parser.add_argument("--limit", type=int, default=None, help="replay at most this many validations per run")
    parser.add_argument("--name", default="validation_hessian")
    args = parser.parse_args()
    runs = sorted(p for p in args.runs.glob(args.pattern) if (p / "summary.json").exists())
    if not runs:
        raise SystemExit(f"no finished active runs ({args.pattern}) in {args.runs}: run search_efficiency.py --workdir first")
    oracles, per_run = {}, []
    for run_dir in runs:
        name = load_config(run_dir / "config.toml").oracle.name
        oracle = oracles.setdefault(name, build_calculator(name))
        per_run.append(replay_run(run_dir, oracle, args.limit))
        r = per_run[-1]
        print(f"{r['run']}: validation {r['validation_calls']['stored']} calls stored, "
              f"{r['validation_calls']['identity']} replayed, {r['validation_calls']['model']} from the model Hessian; "
              f"in all {r['calls_in_all']['stored']} -> {r['calls_in_all']['model']}, "
              f"to target {r['calls_to_target']['stored']} -> {r['calls_to_target']['model']}", flush=True)
    finish(args.name, _headline(per_run, sorted(oracles)))


def _headline(per_run: list[dict], oracles: list[str]) -> dict:
    total = lambda key: sum(r["validation_calls"][key] for r in per_run)
    structures = sum(len(r["structures"]) for r in per_run)
    return {
        "oracles": oracles,
        "runs": len(per_run),
        "structures": structures,
        "validation_calls": {key: total(key) for key in ("stored", "identity", "model")},
        "calls_ratio_identity_to_model": round(total("identity") / max(total("model"), 1), 2),
        "replay_exact": all(r["validation_calls"]["stored"] == r["validation_calls"]["identity"] for r in per_run),
        "same_minimum": sum(r["same_minimum"] for r in per_run),
        "calls_in_all": {r["run"]: [r["calls_in_all"]["stored"], r["calls_in_all"]["model"]] for r in per_run},
        "calls_to_target": {r["run"]: [r["calls_to_target"]["stored"], r["calls_to_target"]["model"]] for r in per_run},
        "per_run": per_run,
    }


if __name__ == "__main__":
    main()
