"""What a search strategy hands back, and the run-level summary built from it."""

from __future__ import annotations

from dataclasses import dataclass

from xtalforge.store import RunStore, StructureRecord


def collapsed_pairs(ctx, atoms) -> str | None:
    """Why a relaxed structure is unphysical: a pair closer than the generation minimum.

    Relaxation guards only stop a collapse below ``relax.min_distance_factor`` × that
    minimum; a structure that ends between the two sits in a hole of the oracle
    (SevenNet-0 ranked a Si16 with 1.50 Å bonds at -17.5 eV/atom, diamond -5.40) and must
    not be ranked. The same rule keeps such labels out of active-learning training sets.
    """
    from xtalforge.dynamics.guards import check_close_pairs

    if atoms is None or ctx.constraints is None:
        return None
    problem = check_close_pairs(atoms, generation_thresholds(ctx, atoms.numbers))
    return None if problem is None else f"relaxed into an unphysical structure: {problem}"


def generation_thresholds(ctx, numbers):
    """(N, N) per-pair minimum distances of the structure-generation constraints (Å)."""
    from xtalforge.dynamics.guards import pair_thresholds

    return pair_thresholds(numbers, ctx.constraints.min_distance_matrix, 1.0, ctx.config.relax.min_distance_floor)


def relaxation_record(ctx, result, *, candidate: int, method: str, stage: str, calls_start: int,
                      operator: str | None, generation: int | None = None, spacegroup_info=None,
                      extra: dict | None = None) -> StructureRecord:
    """The store record of one oracle relaxation (``result`` is a ``RelaxResult``).

    ``calls_start`` is ``ctx.oracle.calls`` before the relaxation began, so the record
    carries exactly the oracle calls spent on it; failed relaxations keep no energies.
    """
    ok = result.status != "failed"
    problem = collapsed_pairs(ctx, result.atoms) if ok else None
    ok = ok and problem is None
    sg = spacegroup_info if ok else None
    return StructureRecord(
        candidate=candidate,
        status="ok" if ok else "failed",
        method=method,
        stage=stage,
        generation=generation,
        energy_per_atom=result.energy_per_atom if ok else None,
        enthalpy_per_atom=result.enthalpy_per_atom if ok else None,
        oracle_calls=ctx.oracle.calls - calls_start,
        oracle_calls_total=ctx.oracle_calls,
        spacegroup_number=sg.number if sg else None,
        spacegroup_symbol=sg.symbol if sg else None,
        relax_status=result.status if problem is None else "unphysical",
        error=None if ok else (problem or result.reason),
        seed=ctx.config.seed,
        operator=operator,
        initial=result.initial,
        relaxed=result.atoms,
        extra=extra or {},
    )


@dataclass
class SearchOutcome:
    method: str
    n_candidates: int
    target_found: bool | None = None
    oracle_calls_to_target: int | None = None


def target_status(store: RunStore) -> tuple[bool, int | None]:
    """Whether a stored record already matched the target, and the calls it took."""
    hits = [r for r in store.records(status="ok") if r.extra.get("matches_target")]
    if not hits:
        return False, None
    return True, min(r.oracle_calls_total for r in hits)
