"""Random structure search (AIRSS-style): every candidate is relaxed with the oracle.

The baseline every other strategy is measured against: oracle calls needed to reach
the ground state. Candidate i is generated from its own seed (run seed, i), so a
resumed run produces exactly the candidates an uninterrupted one would.
"""

from __future__ import annotations

from itertools import count

from tqdm.auto import tqdm

from xtalforge.dynamics import relax_structure
from xtalforge.search.context import RunContext
from xtalforge.search.outcome import SearchOutcome, relaxation_record, target_status
from xtalforge.search.validation import ValidationTask, validate_structures
from xtalforge.similarity import matches, spacegroup
from xtalforge.store import StructureRecord
from xtalforge.structures.generate import candidate_rng, generate_structure

METHOD = "random"


def run_random_search(ctx: RunContext) -> SearchOutcome:
    """Generate, relax with the oracle, record; stop at a budget or at the target."""
    cfg = ctx.config
    done = ctx.store.done_candidates(stage="search")
    found, calls_to_target = target_status(ctx.store)
    bar = tqdm(total=cfg.search.max_oracle_calls, initial=min(ctx.oracle_calls, cfg.search.max_oracle_calls),
               desc=f"random search {ctx.composition}", unit="call", disable=not ctx.progress)
    for i in count():
        if _should_stop(ctx, i, found):
            break
        if i in done:
            continue
        calls_before = ctx.oracle_calls
        record = _relax_candidate(ctx, i)
        if record.status == "ok" and ctx.target is not None and not found:
            record.extra["matches_target"] = matches(record.relaxed, ctx.target)
            if record.extra["matches_target"]:
                found, calls_to_target = True, record.oracle_calls_total
                ctx.log.info("target found by candidate %d after %d oracle calls", i, calls_to_target)
        ctx.store.add(record)
        bar.update(ctx.oracle_calls - calls_before)
        bar.set_postfix(best=_best_text(ctx), refresh=False)
    bar.close()
    _validate_best(ctx)
    found, calls_to_target = target_status(ctx.store)
    n_candidates = ctx.store.count(stage="search")
    return SearchOutcome(method=METHOD, n_candidates=n_candidates,
                         target_found=found if ctx.target is not None else None,
                         oracle_calls_to_target=calls_to_target)


def _validate_best(ctx: RunContext) -> None:
    """Relax the ``search.validate_top`` best distinct structures again at the validation thresholds."""
    n = ctx.config.search.validate_top
    tasks: list[ValidationTask] = []
    for record in ctx.store.best(5 * n, stages=("search",)) if n > 0 else []:
        if len(tasks) == n:
            break
        if not any(matches(record.relaxed, t.atoms) for t in tasks):
            tasks.append(ValidationTask(key=record.candidate, atoms=record.relaxed.copy(), reason="best of the search",
                                        predicted_energy_per_atom=record.energy_per_atom))
    if tasks:
        outcome = validate_structures(ctx, tasks, method=METHOD)
        if outcome.stopped_early == "budget":
            ctx.log.info("validation of the best structures stopped early: the oracle budget is spent")


def _should_stop(ctx: RunContext, i: int, found: bool) -> bool:
    cfg = ctx.config.search
    if ctx.oracle_calls >= cfg.max_oracle_calls:
        ctx.log.info("stopping: oracle budget of %d calls reached", cfg.max_oracle_calls)
        return True
    if cfg.max_candidates is not None and i >= cfg.max_candidates:
        ctx.log.info("stopping: %d candidates done", cfg.max_candidates)
        return True
    if cfg.max_wall_time_s is not None and ctx.wall_time_s >= cfg.max_wall_time_s:
        ctx.log.info("stopping: wall-time budget of %g s reached", cfg.max_wall_time_s)
        return True
    if found and cfg.stop_at_target:
        ctx.log.info("stopping: target structure found")
        return True
    return False


def _relax_candidate(ctx: RunContext, i: int) -> StructureRecord:
    cfg = ctx.config
    atoms = generate_structure(
        ctx.composition, ctx.constraints, candidate_rng(cfg.seed, i), mode=cfg.structures.mode,
        spacegroups=cfg.structures.spacegroups, max_attempts=cfg.structures.max_attempts,
        pyxtal_timeout_s=cfg.structures.pyxtal_timeout_s, cell=cfg.structures.cell,
    )
    calls_start = ctx.oracle.calls
    result = relax_structure(
        atoms, ctx.oracle.calculator, cfg.relax, pressure_gpa=cfg.pressure_gpa,
        min_distances=ctx.constraints.min_distance_matrix(atoms.numbers),
    )
    ok = result.status != "failed"
    sg = spacegroup(result.atoms) if ok else None
    if not ok:
        ctx.log.info("candidate %d failed: %s", i, result.reason)
    return relaxation_record(
        ctx, result, candidate=i, method=METHOD, stage="search", calls_start=calls_start, spacegroup_info=sg,
        operator=f"{cfg.structures.mode}:sg{atoms.info.get('spacegroup', 1)}",
    )


def _best_text(ctx: RunContext) -> str:
    best = ctx.store.best(1)
    return f"{best[0].energy_per_atom:.4f} eV/atom" if best else "-"
