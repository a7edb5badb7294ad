"""``summary.json``: the stable, machine-readable result of a run.

Contract (issue 3, item 10), every key always present:

``composition`` (str), ``method`` (str), ``oracle`` (str), ``oracle_calls`` (int),
``wall_time_s`` (float), ``n_candidates`` (int), ``best`` (an entry or null),
``top`` (list of up to ``top_k`` unique entries, lowest first), ``target_found``
(bool or null when no target was given), ``oracle_calls_to_target`` (int or null).

An entry holds ``energy_per_atom`` (float, eV/atom), ``spacegroup`` (str, Hermann-
Mauguin symbol; null only if spglib fails) and ``cif`` (str, path relative to the run directory), plus
``rank``, ``candidate``, ``stage``, ``spacegroup_number``, ``enthalpy_per_atom``,
``delta_e_mev`` (above the best, meV/atom), ``oracle_calls_total`` (the run's
oracle calls when it was found) and ``n_duplicates``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from ase.io import write

from xtalforge.similarity import Deduplicator, spacegroup
from xtalforge.store.records import RANKED_STAGES, RunStore, StructureRecord

CIF_DIR = "cifs"


def build_summary(
    store: RunStore,
    *,
    composition: str,
    method: str,
    oracle: str,
    oracle_calls: int,
    wall_time_s: float,
    n_candidates: int,
    target_found: bool | None,
    oracle_calls_to_target: int | None,
    top_k: int = 10,
    dedupe: Deduplicator | Callable[[], Deduplicator] = Deduplicator,
    stages: tuple[str, ...] = RANKED_STAGES,
) -> dict:
    """The run summary; writes a CIF of each listed structure into ``run_dir/cifs/``.

    Ranking uses enthalpy per atom when records have one, else energy per atom.
    Failed records never appear. When a candidate has a validation record, it
    replaces that candidate's search record. ``dedupe`` is a Deduplicator or a
    factory of one (called once).
    """
    ranked = ranked_unique(store, dedupe=dedupe, stages=stages, limit=top_k)
    entries = [_entry(store.run_dir, rank, record, n_dup, ranked[0][0]) for rank, (record, n_dup) in enumerate(ranked[:top_k], 1)]
    failed = store.records(status="failed")
    return {
        "composition": str(composition),
        "method": str(method),
        "oracle": str(oracle),
        "oracle_calls": int(oracle_calls),
        "wall_time_s": float(wall_time_s),
        "n_candidates": int(n_candidates),
        "best": entries[0] if entries else None,
        "top": entries,
        "target_found": None if target_found is None else bool(target_found),
        "oracle_calls_to_target": None if oracle_calls_to_target is None else int(oracle_calls_to_target),
        "n_structures": store.count(),
        "n_failed": len(failed),
        "failures": failure_reasons(failed),
    }


def ranked_unique(
    store: RunStore,
    dedupe: Deduplicator | Callable[[], Deduplicator] = Deduplicator,
    stages: tuple[str, ...] = RANKED_STAGES,
    limit: int | None = None,
) -> list[tuple[StructureRecord, int]]:
    """Unique ok structures, lowest enthalpy (else energy) first, each with its duplicate count.

    With ``limit``, stops once ``limit`` unique structures are known and no later
    record can still duplicate one of them (its energy is beyond the de-duplicator's
    energy tolerance), so a long run is not matched in full for a top-10 list.
    """
    dedupe = dedupe if isinstance(dedupe, Deduplicator) else dedupe()
    records = [r for r in store.records(status="ok") if r.stage in stages and r.energy_per_atom is not None and r.atoms is not None]
    validated = {r.candidate for r in records if r.stage == "validation"}
    records = [r for r in records if r.stage == "validation" or r.candidate not in validated]
    records.sort(key=lambda r: (r.ranking_energy, r.row_id or 0))
    unique: list[StructureRecord] = []
    for record in records:
        if (
            limit is not None
            and len(unique) >= limit
            and dedupe.energy_tol is not None
            and record.ranking_energy > unique[limit - 1].ranking_energy + dedupe.energy_tol
        ):
            break
        if dedupe.add(record.atoms, record.ranking_energy, record.row_id) is None:
            unique.append(record)
    groups = dedupe.duplicates
    return [(r, len(groups.get(r.row_id, []))) for r in unique[:limit]]


def failure_reasons(failed: list[StructureRecord]) -> dict[str, int]:
    """Counts of failed records by reason (relax status, else the error's leading words)."""
    return dict(Counter(failure_reason(r) for r in failed).most_common())


def failure_reason(record: StructureRecord) -> str:
    """A short reason for a failed record that groups alike failures together."""
    if record.relax_status and record.relax_status not in ("failed", "ok", "converged"):
        return record.relax_status
    if record.error:
        # Numbers differ between alike failures ("distance 0.31 Å < 1.1 Å"): drop them.
        head = record.error.strip().splitlines()[0].split(":")[0]
        return re.sub(r"[-+]?\d[\d.eE+-]*", "#", head)[:80].strip() or "error"
    return record.relax_status or "unknown"


def cif_name(record: StructureRecord) -> str:
    """File name of a record's CIF, stable across summaries of a growing run."""
    return f"{record.stage}_{record.candidate:06d}.cif"


def _entry(run_dir: Path, rank: int, record: StructureRecord, n_duplicates: int, best: StructureRecord) -> dict:
    relative = Path(CIF_DIR) / cif_name(record)
    path = run_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, record.atoms, format="cif")
    number, symbol = record.spacegroup_number, record.spacegroup_symbol
    if number is None or symbol is None:
        info = spacegroup(record.atoms)
        number, symbol = info.number, info.symbol
    return {
        "rank": rank,
        "candidate": record.candidate,
        "stage": record.stage,
        "energy_per_atom": float(record.energy_per_atom),
        "enthalpy_per_atom": None if record.enthalpy_per_atom is None else float(record.enthalpy_per_atom),
        "delta_e_mev": round(1000.0 * (record.ranking_energy - best.ranking_energy), 3),
        "spacegroup": symbol,
        "spacegroup_number": number,
        "cif": relative.as_posix(),
        "oracle_calls_total": record.oracle_calls_total,
        "n_duplicates": n_duplicates,
    }
