"""What a search strategy hands back, and the run-level summary built from it."""

from __future__ import annotations

from dataclasses import dataclass

from xtalforge.store import RunStore


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
