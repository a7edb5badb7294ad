"""Shared helpers for benchmark scripts: result files with date and machine size."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path

from threadpoolctl import threadpool_limits

# Small matrices everywhere: BLAS threads only contend (see xtalforge.cli).
threadpool_limits(1, user_api="blas")

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference-structures"


def finish(name: str, figures: dict) -> dict:
    """Add date and machine, write ``results/NAME.json``, print it as the last line."""
    record = {
        "benchmark": name,
        "date": _dt.date.today().isoformat(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        **figures,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))
    return record
