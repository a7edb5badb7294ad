"""Oracle validation of proposed minima (seed 004, section II.G), for any strategy.

A strategy that finds candidate minima with a cheap model hands them here as
:class:`ValidationTask` s; each is relaxed with the oracle (tight validation
thresholds of ``[relax]``), every step counted as an oracle call, and stored as one
``stage="validation"`` record. Tasks already validated in an earlier session of the
run are not repeated. Validation stops early at the oracle budget and, when
``search.stop_at_target`` is set, once the target structure is matched.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ase import Atoms
from tqdm.auto import tqdm

from xtalforge.search.context import RunContext
from xtalforge.search.outcome import relaxation_record
from xtalforge.store import StructureRecord

STAGE = "validation"


@dataclass
class ValidationTask:
    """One proposed minimum: ``key`` is its candidate id in the store (unique per run)."""

    key: int
    atoms: Atoms
    predicted_energy_per_atom: float | None = None
    reason: str = "proposed"  # why it is validated, e.g. "cluster", "merged cluster", "near-degenerate"
    info: dict = field(default_factory=dict)  # JSON-serialisable provenance (cluster label, rank, …)


@dataclass
class ValidationOutcome:
    records: list[StructureRecord]  # in task order, earlier sessions' included
    target_found: bool = False
    oracle_calls_to_target: int | None = None
    stopped_early: str | None = None  # "budget" or "target" when tasks were left out


def validate_structures(
    ctx: RunContext,
    tasks: list[ValidationTask],
    *,
    method: str,
    generation: int | None = None,
    max_oracle_calls: int | None = None,
    trajectory_dir: Path | None = None,
    hessian_model=None,
) -> ValidationOutcome:
    """Relax each task's structure with the oracle and store the result.

    With ``generation``, only validations of that generation count as already done
    (a strategy may validate the same candidate again in a later generation).
    ``trajectory_dir`` receives each relaxation's evaluated geometries with their
    oracle values as ``KEY.traj``. ``hessian_model`` is the cheap calculator that proposed the
    structures: BFGS validations start from its Hessian (``relax.validation_hessian``).
    """
    cfg = ctx.config
    budget = max_oracle_calls if max_oracle_calls is not None else cfg.search.max_oracle_calls
    previous = {r.candidate: r for r in ctx.store.records(stage=STAGE, method=method)
                if generation is None or r.generation == generation}
    outcome = ValidationOutcome(records=[])
    note_target(outcome, previous.values())
    if trajectory_dir is not None:
        Path(trajectory_dir).mkdir(parents=True, exist_ok=True)
    bar = tqdm(tasks, desc="oracle validation", unit="structure",
               disable=not ctx.progress or len(tasks) < 2 or not sys.stderr.isatty())
    for task in bar:
        if task.key in previous:
            outcome.records.append(previous[task.key])
            continue
        if outcome.target_found and cfg.search.stop_at_target and ctx.target is not None:
            outcome.stopped_early = "target"
            break
        if ctx.oracle_calls >= budget:
            outcome.stopped_early = "budget"
            ctx.log.info("validation stopped: oracle budget of %d calls reached", budget)
            break
        trajectory = None if trajectory_dir is None else Path(trajectory_dir) / f"{task.key}.traj"
        record = validate_one(ctx, task, method=method, generation=generation, trajectory=trajectory,
                              hessian_model=hessian_model)
        ctx.store.add(record)
        outcome.records.append(record)
        note_target(outcome, [record])
    bar.close()
    return outcome


def validate_one(ctx: RunContext, task: ValidationTask, *, method: str, generation: int | None = None,
                 trajectory: Path | None = None, hessian_model=None) -> StructureRecord:
    """Oracle relaxation of one task (not stored); the record says how it went."""
    from xtalforge.dynamics import relax_structure
    from xtalforge.similarity import matches, spacegroup

    cfg = ctx.config
    calls_start = ctx.oracle.calls
    result = relax_structure(
        task.atoms, ctx.oracle.calculator, cfg.relax, pressure_gpa=cfg.pressure_gpa, validation=True,
        min_distances=ctx.constraints.min_distance_matrix(task.atoms.numbers), trajectory=trajectory,
        hessian_model=hessian_model if uses_model_hessian(cfg.relax) else None,
    )
    ok = result.status != "failed"
    sg = spacegroup(result.atoms) if ok else None
    extra = {
        "reason": task.reason,
        "predicted_energy_per_atom": task.predicted_energy_per_atom,
        "oracle_steps": result.n_steps,
        "start_hessian": result.hessian,
        **task.info,
    }
    if ok and task.predicted_energy_per_atom is not None:
        extra["delta_e_mev"] = 1000.0 * (result.enthalpy_per_atom - task.predicted_energy_per_atom)
    if ok and ctx.target is not None:
        extra["matches_target"] = bool(matches(result.atoms, ctx.target))
    ctx.log.info(
        "validated %d (%s): predicted %s, oracle %s eV/atom after %d steps, %s%s",
        task.key, task.reason, _fmt(task.predicted_energy_per_atom), _fmt(result.energy_per_atom), result.n_steps,
        sg.label if sg else result.reason, " — matches the target" if extra.get("matches_target") else "",
    )
    return relaxation_record(
        ctx, result, candidate=task.key, method=method, stage=STAGE, generation=generation,
        calls_start=calls_start, operator=task.reason, spacegroup_info=sg, extra=extra,
    )


def uses_model_hessian(relax) -> bool:
    """Whether validation starts BFGS from a model's Hessian: the settings ask for it and BFGS can use it."""
    return relax.validation_hessian == "model" and relax.validation_optimizer == "BFGS"


def note_target(outcome: ValidationOutcome, records) -> None:
    """Mark ``outcome`` as having found the target when one of ``records`` matches it (fewest calls)."""
    for record in records:
        if record.status == "ok" and record.extra.get("matches_target"):
            calls = record.oracle_calls_total
            if not outcome.target_found or (calls is not None and calls < (outcome.oracle_calls_to_target or calls + 1)):
                outcome.target_found, outcome.oracle_calls_to_target = True, calls


def _fmt(value: float | None) -> str:
    return "?" if value is None else f"{value:.4f}"
