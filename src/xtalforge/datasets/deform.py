"""Training-set augmentation with elastic deformations (seed 000 section III.C).

Energy curves along hydrostatic, uniaxial and shear strains of given structures,
labelled by the oracle, teach a potential the curvature of the energy around crystals
that melt–quench data samples only sparsely. A strain ε (symmetric 3×3) maps the cell
rows and the atoms affinely: cell' = cell · (I + ε).
"""

from __future__ import annotations

import numpy as np
from ase import Atoms

DEFORMATIONS = ("hydrostatic", "uniaxial", "shear")
_AXES = "xyz"
_SHEAR_PAIRS = ((1, 2), (0, 2), (0, 1))  # yz, xz, xy: Voigt order 4, 5, 6


def strain_values(max_strain: float, n_strains: int) -> np.ndarray:
    """``n_strains`` evenly spaced strains on [-max_strain, max_strain] without zero (that is the undeformed cell)."""
    if n_strains < 1 or max_strain <= 0:
        raise ValueError(f"need n_strains >= 1 and max_strain > 0, got {n_strains} and {max_strain}")
    values = np.linspace(-max_strain, max_strain, n_strains) if n_strains > 1 else np.array([max_strain])
    return values[np.abs(values) > 1e-12]


def strain_tensors(kind: str, strain: float) -> list[tuple[str, np.ndarray]]:
    """(label, symmetric strain tensor) pairs of one kind at one amplitude.

    Shear uses the engineering strain γ = 2ε_ij, as elastic constants are tabulated.
    """
    if kind == "hydrostatic":
        return [("hydrostatic", strain * np.eye(3))]
    if kind == "uniaxial":
        out = []
        for axis in range(3):
            eps = np.zeros((3, 3))
            eps[axis, axis] = strain
            out.append((f"uniaxial_{_AXES[axis]}", eps))
        return out
    if kind == "shear":
        out = []
        for i, j in _SHEAR_PAIRS:
            eps = np.zeros((3, 3))
            eps[i, j] = eps[j, i] = strain / 2.0
            out.append((f"shear_{_AXES[i]}{_AXES[j]}", eps))
        return out
    raise ValueError(f"unknown deformation {kind!r}: choose from {', '.join(DEFORMATIONS)}")


def deform(atoms: Atoms, strain_tensor: np.ndarray) -> Atoms:
    """Copy of ``atoms`` with cell and positions strained by ``strain_tensor`` (no labels)."""
    out = Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    out.info.update({k: v for k, v in atoms.info.items() if isinstance(v, (str, int, float))})
    out.set_cell(atoms.cell.array @ (np.eye(3) + strain_tensor), scale_atoms=True)
    return out


def elastic_deformations(
    atoms: Atoms,
    kinds: tuple[str, ...] | list[str] = DEFORMATIONS,
    max_strain: float = 0.04,
    n_strains: int = 4,
    include_undeformed: bool = True,
) -> list[Atoms]:
    """Deformed copies of ``atoms`` for every kind, axis and strain amplitude.

    Each carries ``info["deformation"]`` (e.g. ``shear_xy``), ``info["strain"]`` and
    ``info["phase"] = "deform"``; the undeformed structure comes first when asked for.
    """
    out: list[Atoms] = []
    if include_undeformed:
        base = deform(atoms, np.zeros((3, 3)))
        base.info.update(deformation="none", strain=0.0, phase="deform")
        out.append(base)
    for kind in kinds:
        for value in strain_values(max_strain, n_strains):
            for label, eps in strain_tensors(kind, float(value)):
                strained = deform(atoms, eps)
                strained.info.update(deformation=label, strain=float(value), phase="deform")
                out.append(strained)
    return out


def label_deformations(structures: list[Atoms], oracle, **kwargs) -> tuple[list[Atoms], list[str]]:
    """Elastic deformations of every structure, labelled by ``oracle``.

    Returns the labelled frames and one line per failed single point (kept out of the set).
    """
    candidates: list[Atoms] = []
    for index, atoms in enumerate(structures):
        for strained in elastic_deformations(atoms, **kwargs):
            strained.info["source_index"] = index
            candidates.append(strained)
    frames, failures = [], []
    for strained, result in zip(candidates, oracle.label(candidates, desc="deformations")):
        if result.ok:
            frames.append(result.to_atoms(strained))
        else:
            failures.append(f"structure {strained.info['source_index']} {strained.info['deformation']} "
                            f"{strained.info['strain']:+.3f}: {result.error}")
    return frames, failures
