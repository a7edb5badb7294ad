"""One entry point for every search method: open (or resume) the run, search, summarise."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from xtalforge.config import RunConfig
from xtalforge.search.active import run_active_search
from xtalforge.search.context import RunContext, open_run
from xtalforge.search.outcome import SearchOutcome
from xtalforge.search.random_search import run_random_search
from xtalforge.similarity import Deduplicator
from xtalforge.store import build_summary, write_summary

SEARCH_METHODS: dict[str, Callable[[RunContext], SearchOutcome]] = {
    "random": run_random_search,
    "active": run_active_search,
}


def run_search(config: RunConfig, run_dir: str | Path, *, progress: bool = True, oracle=None) -> dict:
    """Run (or resume) the search ``config`` describes in ``run_dir``; return the summary."""
    strategy = SEARCH_METHODS[config.search.method]
    ctx = open_run(config, run_dir, oracle=oracle, progress=progress)
    ctx.log.info("search %s for %s with oracle %s", config.search.method, ctx.composition, config.oracle.name)
    try:
        outcome = strategy(ctx)
    finally:
        ctx.log.info("oracle calls this session: %d (%s)", ctx.oracle.calls, ctx.oracle.as_dict())
    summary = build_summary(
        ctx.store,
        composition=ctx.composition.formula,
        method=outcome.method,
        oracle=config.oracle.name,
        oracle_calls=ctx.oracle_calls,
        wall_time_s=round(ctx.wall_time_s, 2),
        n_candidates=outcome.n_candidates,
        target_found=outcome.target_found,
        oracle_calls_to_target=outcome.oracle_calls_to_target,
        top_k=config.search.top_k,
        dedupe=lambda: Deduplicator(energy_tol=config.search.energy_tol),
    )
    write_summary(ctx.run_dir, summary)
    ctx.log.info("best %.4f eV/atom (%s); summary in %s", summary["best"]["energy_per_atom"] if summary["best"] else float("nan"),
                 (summary["best"] or {}).get("spacegroup"), ctx.run_dir / "summary.json")
    return summary
