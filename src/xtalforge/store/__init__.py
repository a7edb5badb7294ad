"""Results store: one ASE SQLite row per structure, the run summary, log and lock."""

from xtalforge.store.records import DB_NAME, RANKED_STAGES, RunStore, StructureRecord
from xtalforge.store.rundir import (
    LOG_NAME,
    SUMMARY_NAME,
    open_log,
    read_json,
    read_summary,
    run_lock,
    write_json_atomic,
    write_summary,
)
from xtalforge.store.summary import (
    CIF_DIR,
    build_summary,
    failure_reason,
    failure_reasons,
    ranked_unique,
)

__all__ = [
    "CIF_DIR",
    "DB_NAME",
    "LOG_NAME",
    "RANKED_STAGES",
    "SUMMARY_NAME",
    "RunStore",
    "StructureRecord",
    "build_summary",
    "failure_reason",
    "failure_reasons",
    "open_log",
    "ranked_unique",
    "read_json",
    "read_summary",
    "run_lock",
    "write_json_atomic",
    "write_summary",
]
