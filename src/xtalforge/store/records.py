"""Typed structure records in an ASE SQLite database, one row per finished structure.

A row holds the relaxed geometry (or the initial one when there is no relaxed one),
the typed scalar fields of :class:`StructureRecord` as ASE key-value pairs (so
``ase db structures.db status=ok`` works) and the rest (initial geometry, parents,
operator, error text, ``extra``) in the row's JSON ``data`` blob. ``RunStore.add``
writes a row in a single SQLite transaction, so a killed process leaves either the
whole row or nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.db import connect

from xtalforge.errors import CheckpointError

DB_NAME = "structures.db"
# Stages whose ok records are relaxed minima that rankings, summaries and reports compare.
RANKED_STAGES = ("search", "validation")
STATUSES = ("ok", "failed")

# Typed scalar fields stored as ASE key-value pairs (queryable); None values are omitted.
_KEY_FIELDS = {
    "candidate": int,
    "status": str,
    "method": str,
    "stage": str,
    "generation": int,
    "energy_per_atom": float,
    "enthalpy_per_atom": float,
    "oracle_calls": int,
    "oracle_calls_total": int,
    "spacegroup_number": int,
    "spacegroup_symbol": str,
    "relax_status": str,
    "seed": int,
}
_REQUIRED_KEYS = ("candidate", "status", "method", "stage")
# Results a stored geometry may carry from its oracle single point.
_STORED_RESULTS = ("energy", "free_energy", "forces", "stress")


@dataclass
class StructureRecord:
    """One structure of a run and where it came from.

    ``candidate`` identifies the structure within the run; together with ``stage``
    it identifies a piece of work (``done_candidates``). ``oracle_calls`` were spent
    on this structure; ``oracle_calls_total`` is the run's cumulative count when the
    record was written (the x axis of "best energy vs oracle calls").
    """

    candidate: int
    status: str  # "ok" | "failed"
    method: str  # "random" | "active" | ...
    stage: str = "search"  # "search" | "validation" | "pool" | "label" | ...
    generation: int | None = None  # cycle for active learning
    energy_per_atom: float | None = None  # eV/atom
    enthalpy_per_atom: float | None = None  # eV/atom, under external pressure
    oracle_calls: int = 0
    oracle_calls_total: int | None = None
    spacegroup_number: int | None = None
    spacegroup_symbol: str | None = None
    relax_status: str | None = None
    error: str | None = None
    seed: int | None = None
    parents: list[int] = field(default_factory=list)
    operator: str | None = None
    initial: Atoms | None = None
    relaxed: Atoms | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable
    row_id: int | None = field(default=None, compare=False)  # set when read from a store

    @property
    def ranking_energy(self) -> float | None:
        """Enthalpy per atom when known (under pressure), else energy per atom."""
        return self.enthalpy_per_atom if self.enthalpy_per_atom is not None else self.energy_per_atom

    @property
    def atoms(self) -> Atoms | None:
        """The final geometry: relaxed when there is one, else initial."""
        return self.relaxed if self.relaxed is not None else self.initial


class RunStore:
    """The structures of one run: ``run_dir/structures.db`` (ASE SQLite)."""

    def __init__(self, run_dir: str | Path, create: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / DB_NAME
        if not self.path.exists():
            if not create:
                raise CheckpointError(f"no {DB_NAME} in {self.run_dir}: run `xtalforge search` with --out {self.run_dir} first")
            self.run_dir.mkdir(parents=True, exist_ok=True)
        # SQLite locks and rolls back on its own; ASE's extra lock file would outlive a writer killed
        # inside a write and block every later writer (the resumed run) until its timeout.
        self._db = connect(str(self.path), type="db", append=True, serial=False, use_lock_file=False)
        self._guard(self._db.count)  # fail now, with the fix, if the file is not a database

    def __repr__(self) -> str:
        return f"RunStore({str(self.run_dir)!r})"

    def __len__(self) -> int:
        return self.count()

    # -- writing ---------------------------------------------------------------

    def add(self, record: StructureRecord) -> int:
        """Write ``record`` as one row in one transaction; returns the row id."""
        key_value_pairs = _key_value_pairs(record)
        data = {
            "initial": _atoms_to_arrays(record.initial),
            "has_relaxed": record.relaxed is not None,
            "parents": [int(p) for p in record.parents],
            "operator": record.operator,
            "error": record.error,
            "extra": _jsonable(record.extra, "extra"),
        }
        row_atoms = _plain_copy(record.atoms) if record.atoms is not None else Atoms()
        row_id = self._guard(lambda: self._db.write(row_atoms, key_value_pairs=key_value_pairs, data=data))
        record.row_id = row_id
        return row_id

    # -- reading ---------------------------------------------------------------

    def records(
        self,
        status: str | None = None,
        stage: str | None = None,
        method: str | None = None,
        generation: int | None = None,
    ) -> list[StructureRecord]:
        """Records matching every filter given, in the order they were written."""
        query = _filters(status=status, stage=stage, method=method, generation=generation)
        return self._guard(lambda: [self._to_record(row) for row in self._db.select(sort="id", **query)])

    def count(
        self,
        status: str | None = None,
        stage: str | None = None,
        method: str | None = None,
        generation: int | None = None,
    ) -> int:
        """Number of rows matching every filter given."""
        query = _filters(status=status, stage=stage, method=method, generation=generation)
        return self._guard(lambda: self._db.count(**query))

    def done_candidates(self, stage: str = "search") -> set[int]:
        """Candidates with a finished row (ok or failed) in ``stage``: work not to repeat."""
        return {int(kvp["candidate"]) for _, kvp in self._key_values(stage=stage)}

    def best(self, k: int = 1, stages: tuple[str, ...] | None = RANKED_STAGES) -> list[StructureRecord]:
        """The ``k`` ok records of ``stages`` (None = all) lowest in enthalpy (else energy) per atom.

        Not de-duplicated: see :func:`xtalforge.store.build_summary` for unique structures.
        Ranks on the key-value pairs alone and reads only the ``k`` winning rows, so
        it stays cheap when called after every candidate.
        """
        ranked = []
        for row_id, kvp in self._key_values(status="ok"):
            energy = kvp.get("enthalpy_per_atom", kvp.get("energy_per_atom"))
            if energy is not None and (stages is None or kvp.get("stage") in stages):
                ranked.append((float(energy), row_id))
        ranked.sort()
        return self._guard(lambda: [self._to_record(self._db.get(id=row_id)) for _, row_id in ranked[:k]])

    def oracle_calls_spent(self) -> int:
        """Sum of oracle calls over all stored records."""
        return sum(int(kvp.get("oracle_calls", 0)) for _, kvp in self._key_values())

    # -- internals -------------------------------------------------------------

    def _guard(self, operation):
        """Run a database operation; an unreadable file becomes a one-line CheckpointError."""
        try:
            return operation()
        except (sqlite3.DatabaseError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(
                f"{self.path} is corrupt or not an xtalforge structure database ({exc}): "
                "move it away to start the run afresh, or choose another --out"
            ) from None

    def _key_values(self, **filters) -> list[tuple[int, dict]]:
        """(row id, key-value pairs) of matching rows, in id order, without decoding geometry.

        Reads ASE's ``systems`` table directly: going through ``select`` builds a
        full row object per structure, a hundred times slower, and ``best`` runs
        after every candidate.
        """
        query = _filters(**filters)

        def scan():
            with contextlib.closing(sqlite3.connect(self.path, timeout=60)) as con:
                rows = con.execute("SELECT id, key_value_pairs FROM systems ORDER BY id").fetchall()
            return [(row_id, json.loads(text)) for row_id, text in rows]

        rows = self._guard(scan)
        return [(row_id, kvp) for row_id, kvp in rows if all(kvp.get(k) == v for k, v in query.items())]

    def _to_record(self, row) -> StructureRecord:
        kvp = row.key_value_pairs
        missing = [k for k in _REQUIRED_KEYS if k not in kvp]
        if missing:
            raise CheckpointError(
                f"{self.path} row {row.id} lacks {', '.join(missing)}: it was not written by xtalforge; "
                "move the file away or choose another --out"
            )
        data = row.data
        values = {name: _typed(kvp[name], kind) for name, kind in _KEY_FIELDS.items() if name in kvp}
        return StructureRecord(
            **values,
            error=data.get("error"),
            parents=[int(p) for p in data.get("parents", [])],
            operator=data.get("operator"),
            initial=_arrays_to_atoms(data.get("initial")),
            relaxed=row.toatoms() if data.get("has_relaxed", True) else None,
            extra=dict(data.get("extra", {})),
            row_id=row.id,
        )


def _filters(**filters) -> dict:
    return {k: v for k, v in filters.items() if v is not None}


def _typed(value, kind):
    return kind(value.item() if isinstance(value, np.generic) else value)


def _key_value_pairs(record: StructureRecord) -> dict:
    if record.status not in STATUSES:
        raise ValueError(f"record status must be one of {STATUSES}, got {record.status!r}")
    pairs = {}
    for name, kind in _KEY_FIELDS.items():
        value = getattr(record, name)
        if value is None:
            continue
        if isinstance(value, np.generic):
            value = value.item()
        if kind is float:
            value = float(value)
            if not math.isfinite(value):
                continue  # NaN/inf are "unknown", read back as None
        elif kind is int:
            if isinstance(value, bool) or int(value) != value:
                raise ValueError(f"record field {name} must be an integer, got {value!r}")
            value = int(value)
        elif not isinstance(value, str):
            raise ValueError(f"record field {name} must be a string, got {value!r}")
        pairs[name] = value
    return pairs


def _plain_copy(atoms: Atoms) -> Atoms:
    """Geometry only, plus the single-point results when they belong to these positions."""
    copy = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    calc = atoms.calc
    results = getattr(calc, "results", None)
    if results:
        # Results belong to this geometry only if ASE's state check sees no change;
        # a calculator without that check gets the geometry stored alone.
        check_state = getattr(calc, "check_state", None)
        if check_state is not None and not check_state(atoms):
            kept = {k: np.array(v) if np.ndim(v) else float(v) for k, v in results.items() if k in _STORED_RESULTS}
            if kept:
                copy.calc = SinglePointCalculator(copy, **kept)
    return copy


def _atoms_to_arrays(atoms: Atoms | None) -> dict | None:
    if atoms is None:
        return None
    return {
        "numbers": np.asarray(atoms.numbers, dtype=int),
        "positions": np.asarray(atoms.positions, dtype=float),
        "cell": np.asarray(atoms.cell.array, dtype=float),
        "pbc": np.asarray(atoms.pbc, dtype=bool),
    }


def _arrays_to_atoms(arrays: dict | None) -> Atoms | None:
    if arrays is None:
        return None
    return Atoms(numbers=arrays["numbers"], positions=arrays["positions"], cell=arrays["cell"], pbc=arrays["pbc"])


def _jsonable(value, where: str):
    """``value`` with numpy scalars as Python numbers; rejects what JSON cannot hold."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) or value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value), where)
    raise ValueError(f"record {where} holds a {type(value).__name__}, which the store cannot save: use numbers, strings, lists or dicts")
