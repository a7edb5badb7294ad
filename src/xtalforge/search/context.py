"""What every search strategy works with: config, run directory, oracle, store, log.

A run directory holds ``config.toml`` (resolved), ``structures.db`` (ASE SQLite, one
row per finished structure), ``run.log`` and ``summary.json``. Re-opening a directory
that holds a run resumes it: the oracle calls already spent are the sum over stored
records, and strategies ask the store which work is done.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ase import Atoms
from ase.io import read

from xtalforge.config import RunConfig, dump_toml
from xtalforge.errors import CheckpointError, ConfigError
from xtalforge.oracles import Oracle, build_executor, build_oracle
from xtalforge.store import RunStore, open_log
from xtalforge.structures.composition import Composition
from xtalforge.structures.constraints import Constraints

# Settings that define a run: resuming with other values would mix two searches.
_IDENTITY_KEYS = ("composition", "formula_units", "seed", "pressure_gpa")


@dataclass
class RunContext:
    config: RunConfig
    run_dir: Path
    composition: Composition
    constraints: Constraints
    oracle: Oracle
    store: RunStore
    log: logging.Logger
    target: Atoms | None = None
    progress: bool = True
    calls_before: int = 0  # oracle calls spent by earlier sessions of this run
    started: float = field(default_factory=time.perf_counter)
    wall_time_before: float = 0.0

    @property
    def oracle_calls(self) -> int:
        """Oracle single points of the whole run, earlier sessions included."""
        return self.calls_before + self.oracle.calls

    @property
    def wall_time_s(self) -> float:
        return self.wall_time_before + time.perf_counter() - self.started


def open_run(config: RunConfig, run_dir: str | Path, *, oracle: Oracle | None = None, progress: bool = True) -> RunContext:
    """Create or resume the run in ``run_dir``."""
    check_search_config(config)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_same_run(config, run_dir)
    (run_dir / "config.toml").write_text(dump_toml(config))
    composition = Composition.parse(config.composition, config.formula_units)
    store = RunStore(run_dir)
    ctx = RunContext(
        config=config,
        run_dir=run_dir,
        composition=composition,
        constraints=Constraints.from_config(composition, config.structures),
        oracle=oracle or build_oracle(config.oracle, build_executor(config.oracle.executor, progress=progress)),
        store=store,
        log=open_log(run_dir),
        target=_load_target(config),
        progress=progress,
    )
    ctx.calls_before = sum(r.oracle_calls or 0 for r in store.records())
    ctx.wall_time_before = _previous_wall_time(run_dir)
    if ctx.calls_before:
        ctx.log.info("resuming %s: %d structures and %d oracle calls already done", run_dir, store.count(), ctx.calls_before)
    return ctx


def check_search_config(config: RunConfig) -> None:
    """The ``[search]`` budgets and tolerances are in range, or a one-line ConfigError says which is not."""
    search = config.search
    checks = [
        (search.max_oracle_calls >= 1, "search.max_oracle_calls must be at least 1"),
        (search.max_candidates is None or search.max_candidates >= 1,
         "search.max_candidates must be at least 1 (or left out for no limit)"),
        (search.max_wall_time_s is None or search.max_wall_time_s > 0,
         "search.max_wall_time_s must be positive (or left out for no limit)"),
        (search.top_k >= 1, "search.top_k must be at least 1"),
        (search.energy_tol >= 0, "search.energy_tol is an energy window in eV/atom: give 0 or more"),
        (search.validate_top >= 0, "search.validate_top must not be negative: give 0 to turn validation off"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _check_same_run(config: RunConfig, run_dir: Path) -> None:
    previous = run_dir / "config.toml"
    if not previous.exists():
        return
    import tomllib

    try:
        old = tomllib.loads(previous.read_text())
    except tomllib.TOMLDecodeError:
        raise CheckpointError(f"{previous} is corrupt: delete the run directory or choose another --out") from None
    for key in _IDENTITY_KEYS:
        if old.get(key) != getattr(config, key):
            raise ConfigError(
                f"{run_dir} holds a run with {key} = {old.get(key)!r}, not {getattr(config, key)!r}: "
                "choose another --out or use the same config to resume"
            )
    if old.get("search", {}).get("method") != config.search.method:
        raise ConfigError(f"{run_dir} holds a {old.get('search', {}).get('method')!r} search: choose another --out")


def _previous_wall_time(run_dir: Path) -> float:
    from xtalforge.store import read_summary

    try:
        return float((read_summary(run_dir) or {}).get("wall_time_s") or 0.0)
    except CheckpointError:
        return 0.0


def _load_target(config: RunConfig) -> Atoms | None:
    path = config.resolve_path(config.search.target)
    if path is None:
        return None
    if not path.is_file():
        raise ConfigError(f"search.target file {path} not found: give a CIF path relative to the config file")
    try:
        return read(path)
    except Exception as exc:
        raise ConfigError(f"cannot read search.target {path}: {exc}") from None
