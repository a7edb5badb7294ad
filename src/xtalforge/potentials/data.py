"""Labelled frames: reading extxyz / ASE databases and pulling out energies, forces, stresses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms

from xtalforge.errors import XtalforgeError


@dataclass
class Labels:
    """Reference labels of one frame (None where the frame has none)."""

    energy: float
    forces: np.ndarray | None  # (n, 3) eV/Å
    stress: np.ndarray | None  # (3, 3) eV/Å³, ASE sign


def frame_labels(atoms: Atoms) -> Labels | None:
    """Energy, forces and stress attached to ``atoms`` (a SinglePointCalculator, as read from
    extxyz), or None when the frame has no finite energy."""
    calc = atoms.calc
    results = getattr(calc, "results", None) or {}
    energy = results.get("energy", results.get("free_energy"))
    if energy is None or not np.isfinite(energy):
        return None
    forces = results.get("forces")
    if forces is not None:
        forces = np.asarray(forces, dtype=float).reshape(len(atoms), 3)
        if not np.all(np.isfinite(forces)):
            forces = None
    stress = results.get("stress")
    if stress is not None and np.all(atoms.pbc):
        stress = np.asarray(stress, dtype=float)
        if stress.shape == (6,):
            xx, yy, zz, yz, xz, xy = stress
            stress = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
        stress = stress.reshape(3, 3) if np.all(np.isfinite(stress)) else None
    else:
        stress = None
    return Labels(float(energy), forces, stress)


def read_frames(path) -> list[Atoms]:
    """Labelled frames from an extxyz file (or anything ase.io reads) or an ASE database (.db)."""
    from ase.io import read

    path = Path(path)
    if not path.is_file():
        raise XtalforgeError(f"data file {path} not found: pass an extxyz file or an ASE database with labels")
    try:
        if path.suffix == ".db" or _is_sqlite(path):
            frames = _read_database(path)
        else:
            frames = read(path, index=":")
    except XtalforgeError:
        raise
    except Exception as exc:  # noqa: BLE001 -- ase.io raises many types for bad files
        raise XtalforgeError(f"cannot read {path} ({type(exc).__name__}: {exc}): pass an extxyz file or an ASE .db") from None
    frames = [frames] if isinstance(frames, Atoms) else list(frames)
    labelled = [f for f in frames if frame_labels(f) is not None]
    if not labelled:
        raise XtalforgeError(f"{path} holds no structures with energies: label them with an oracle first")
    return labelled


def _is_sqlite(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(16).startswith(b"SQLite format 3")


def _read_database(path: Path) -> list[Atoms]:
    from ase.db import connect

    frames = []
    for row in connect(str(path)).select():
        atoms = row.toatoms(add_additional_information=False)
        frames.append(atoms)  # toatoms attaches a SinglePointCalculator when the row has results
    return frames
