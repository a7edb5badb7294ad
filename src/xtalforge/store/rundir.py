"""Run-directory files: atomic JSON, the summary, the log and a lock against two writers."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from xtalforge.errors import CheckpointError

SUMMARY_NAME = "summary.json"
LOG_NAME = "run.log"
LOCK_NAME = ".lock"
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON so that ``path`` always holds either the old or the new file.

    The text goes to a temporary file in the same directory, is flushed to disk and
    then renamed over ``path`` (``os.replace`` is atomic on POSIX).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=2, default=_json_default, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; run files are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def read_json(path: str | Path) -> Any:
    """JSON from ``path``; a corrupt file is a one-line CheckpointError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt ({exc}): delete it and rerun the command that writes it") from None


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_summary(run_dir: str | Path, summary: dict) -> Path:
    """Write ``run_dir/summary.json`` atomically."""
    return write_json_atomic(Path(run_dir) / SUMMARY_NAME, summary)


def read_summary(run_dir: str | Path) -> dict | None:
    """``run_dir/summary.json``, or None when the run has not written one yet."""
    path = Path(run_dir) / SUMMARY_NAME
    if not path.exists():
        return None
    summary = read_json(path)
    if not isinstance(summary, dict):
        raise CheckpointError(f"{path} is not a summary (a JSON object expected): delete it and rerun `xtalforge search`")
    return summary


def open_log(run_dir: str | Path, level: int = logging.INFO, console: bool = False) -> logging.Logger:
    """Logger appending to ``run_dir/run.log`` (and to stderr when ``console``).

    Calling it again for the same directory returns the same logger without
    duplicating handlers.
    """
    path = (Path(run_dir) / LOG_NAME).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(f"xtalforge.run.{path.parent}")
    logger.setLevel(level)
    logger.propagate = False  # the run log is the record; the CLI decides what the console shows
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    file_handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger.addHandler(file_handler)
    if console:
        stream = logging.StreamHandler()
        stream.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(stream)
    return logger


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``run_dir`` so that two processes never write one run.

    The lock is an ``flock`` on ``run_dir/.lock``; the kernel drops it when the
    holder dies, so a killed run never leaves a stale lock behind.
    """
    path = Path(run_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:  # closing the descriptor releases the flock
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise CheckpointError(
                f"{path.parent} is in use by another xtalforge process (pid {holder}): "
                "wait for it to finish or choose another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield path
