"""Oracle calls of the validation relaxation with FIRE, L-BFGS and BFGS, from real validation starts.

``data/validation_starts.extxyz`` holds 32 structures (8 per system: Si16, Na8Cl8, Ga8As8,
Al4O6) that active searches with SevenNet-0 handed to validation (2026-11-22 to 11-25): pool
structures relaxed by an NNP ensemble, so near, but not at, an oracle minimum. Each is relaxed
with the oracle at the validation thresholds of ``[relax]`` (0.02 eV/Å, 0.4 GPa, 500 steps), once
per optimizer, counting oracle calls. The headline is the total calls per optimizer and the
ratio to FIRE; the minima are compared by energy and space group, since a cheaper optimizer is
no use if it ends elsewhere.

The same three optimizers also relax fresh symmetric candidates (``--search-starts`` per system,
PyXtal, primitive cells, seed 004 Table I constraints) at the search thresholds (0.05 eV/Å, 2 GPa,
300 steps): the search relaxations start far from any minimum, where the ranking may differ.

    python benchmarks/validation_optimizer.py                     # SevenNet-0, about 10 min on one core
    python benchmarks/validation_optimizer.py --limit 4 --search-starts 1 --oracle sw  # smoke run

The figures (results/validation_optimizer.json) decided ``relax.validation_optimizer = "BFGS"``
while search relaxations keep ``relax.optimizer = "FIRE"``.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

from _common import finish
from ase.io import read
from search_efficiency import SYSTEMS

from xtalforge.config import RelaxConfig
from xtalforge.dynamics import relax_structure
from xtalforge.oracles.registry import build_calculator
from xtalforge.similarity import spacegroup
from xtalforge.structures import Constraints
from xtalforge.structures.generate import generate_many

STARTS = Path(__file__).resolve().parent / "data" / "validation_starts.extxyz"
OPTIMIZERS = ("FIRE", "LBFGS", "BFGS")
SAME_MINIMUM_MEV = 5.0  # meV/atom: same space group and this close counts as the same minimum


def relax_all(starts, calculator, optimizer: str, validation: bool) -> list[dict]:
    """Relax every start with ``optimizer`` at the validation or the search thresholds of ``[relax]``."""
    config = RelaxConfig(validation_optimizer=optimizer) if validation else RelaxConfig(optimizer=optimizer)
    out = []
    for atoms in starts:
        result = relax_structure(atoms, calculator, config, validation=validation)
        sg = spacegroup(result.atoms) if result.ok else None
        out.append({"calls": result.n_calls, "status": result.status, "energy_per_atom": result.energy_per_atom,
                    "spacegroup": sg.number if sg else None})
    return out


def search_starts(per_system: int, seed: int = 0) -> list:
    """Fresh symmetric candidates of every system, as the search relaxes them (primitive cells)."""
    starts = []
    for system, spec in SYSTEMS.items():
        if system == "Si8":
            continue
        constraints = Constraints(min_distances=spec["min_distances"], lattice_min=spec["lattice"][0],
                                  lattice_max=spec["lattice"][1])
        for atoms in generate_many(spec["composition"], constraints, per_system, seed, cell="primitive",
                                   progress=False):
            atoms.info["system"] = system
            starts.append(atoms)
    return starts


def compare(reference: list[dict], other: list[dict]) -> dict:
    """How often ``other`` ends at the reference's minimum, and how often lower or higher."""
    same = lower = higher = 0
    for a, b in zip(reference, other, strict=True):
        if a["energy_per_atom"] is None or b["energy_per_atom"] is None:
            continue
        delta = 1000.0 * (b["energy_per_atom"] - a["energy_per_atom"])
        if abs(delta) <= SAME_MINIMUM_MEV and a["spacegroup"] == b["spacegroup"]:
            same += 1
        elif delta < 0:
            lower += 1
        else:
            higher += 1
    return {"same_minimum": same, "lower": lower, "higher": higher}


def measure(starts, calculator, validation: bool) -> dict:
    """Calls per optimizer (in all and per system), minima against FIRE's, failures and time."""
    results, seconds = {}, {}
    for optimizer in OPTIMIZERS:
        t0 = time.perf_counter()
        results[optimizer] = relax_all(starts, calculator, optimizer, validation)
        seconds[optimizer] = round(time.perf_counter() - t0, 1)
    by_system: dict = defaultdict(lambda: dict.fromkeys(OPTIMIZERS, 0))
    for i, atoms in enumerate(starts):
        for optimizer in OPTIMIZERS:
            by_system[atoms.info["system"]][optimizer] += results[optimizer][i]["calls"]
    totals = {o: sum(r["calls"] for r in results[o]) for o in OPTIMIZERS}
    print("validation starts" if validation else "search starts")
    for system, calls in by_system.items():
        print(f"  {system:8s} " + "  ".join(f"{o} {calls[o]:5d}" for o in OPTIMIZERS))
    return {
        "structures": len(starts), "oracle_calls": totals,
        "calls_ratio_to_fire": {o: round(totals[o] / totals["FIRE"], 3) for o in OPTIMIZERS},
        "calls_by_system": dict(by_system),
        "versus_fire": {o: compare(results["FIRE"], results[o]) for o in OPTIMIZERS if o != "FIRE"},
        "not_converged": {o: sum(r["status"] != "converged" for r in results[o]) for o in OPTIMIZERS},
        "failed": {o: sum(r["status"] == "failed" for r in results[o]) for o in OPTIMIZERS},
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--oracle", default="sevennet")
    parser.add_argument("--limit", type=int, default=None, help="first N validation starts only")
    parser.add_argument("--search-starts", type=int, default=6, help="fresh symmetric candidates per system")
    args = parser.parse_args()
    calculator = build_calculator(args.oracle)
    validation = measure(read(STARTS, ":")[: args.limit], calculator, validation=True)
    search = measure(search_starts(args.search_starts), calculator, validation=False)
    finish("validation_optimizer", {"oracle": args.oracle, **validation, "search_relaxations": search})


if __name__ == "__main__":
    main()
