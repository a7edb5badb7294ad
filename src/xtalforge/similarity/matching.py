"""Structure matching and de-duplication with pymatgen's StructureMatcher.

StructureMatcher compares reduced (primitive) cells, so a supercell matches its
primitive structure and a run for Si16 finds the 8-atom diamond target. Before the
(expensive) matcher, a de-duplicator discards pairs that cannot match: different
reduced formula, energies further apart than ``energy_tol``, or RDF fingerprints
further apart than ``rdf_prefilter`` in Pearson distance (seed 001).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from ase import Atoms
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

from xtalforge.similarity.rdf import pairwise_pearson, rdf_fingerprint


def to_structure(atoms: Atoms) -> Structure:
    """pymatgen Structure of ``atoms`` (geometry and species only)."""
    return Structure(atoms.cell.array, atoms.get_chemical_symbols(), atoms.positions, coords_are_cartesian=True)


@lru_cache(maxsize=32)
def structure_matcher(ltol: float = 0.2, stol: float = 0.3, angle_tol: float = 5.0, scale: bool = True) -> StructureMatcher:
    """A StructureMatcher comparing primitive cells, trying supercells when needed."""
    return StructureMatcher(
        ltol=ltol, stol=stol, angle_tol=angle_tol, primitive_cell=True, scale=scale, attempt_supercell=True
    )


def matches(
    atoms: Atoms | Structure,
    reference: Atoms | Structure,
    ltol: float = 0.2,
    stol: float = 0.3,
    angle_tol: float = 5.0,
    scale: bool = True,
) -> bool:
    """Whether ``atoms`` is the same crystal as ``reference`` (any cell, any volume if ``scale``).

    ``scale=True`` compares after normalising volumes, so a structure relaxed with a
    different oracle (another lattice constant) still matches its target.
    """
    s1 = atoms if isinstance(atoms, Structure) else to_structure(atoms)
    s2 = reference if isinstance(reference, Structure) else to_structure(reference)
    if s1.composition.reduced_formula != s2.composition.reduced_formula:
        return False
    return bool(structure_matcher(ltol, stol, angle_tol, scale).fit(s1, s2))


@dataclass
class _Unique:
    key: Hashable
    energy: float | None
    structure: Structure
    formula: str
    duplicates: list[Hashable] = field(default_factory=list)


class Deduplicator:
    """Collects structures one at a time and tells which are duplicates of earlier ones.

    Two structures are duplicates when their reduced formulas agree, their energies
    per atom agree within ``energy_tol`` (when both are known), their RDF Pearson
    distance is at most ``rdf_prefilter`` (None disables this pre-filter) and
    StructureMatcher (``ltol``, ``stol``, ``angle_tol``, ``scale``) fits them.
    Add structures in order of increasing energy to keep the lowest of each group.
    """

    def __init__(
        self,
        energy_tol: float | None = 0.005,
        ltol: float = 0.2,
        stol: float = 0.3,
        angle_tol: float = 5.0,
        rdf_prefilter: float | None = 0.05,
        scale: bool = True,
    ):
        self.energy_tol = energy_tol
        self.rdf_prefilter = rdf_prefilter
        self.matcher = structure_matcher(ltol, stol, angle_tol, scale)
        self._unique: list[_Unique] = []
        # Per unique structure, in growing arrays so each add is O(n), not an O(n) copy.
        self._fingerprints = _GrowingArray()
        self._energies = _GrowingArray()
        self._formula_ids = _GrowingArray(dtype=int)
        self._formula_index: dict[str, int] = {}
        self.n_matcher_calls = 0  # StructureMatcher fits run (what the pre-filters save)

    def __len__(self) -> int:
        return len(self._unique)

    @property
    def keys(self) -> list[Hashable]:
        """Keys of the unique structures, in the order they were added."""
        return [u.key for u in self._unique]

    @property
    def duplicates(self) -> dict[Hashable, list[Hashable]]:
        """For each unique key, the keys found to duplicate it."""
        return {u.key: list(u.duplicates) for u in self._unique}

    def add(self, atoms: Atoms, energy_per_atom: float | None, key: Hashable) -> Hashable | None:
        """Record ``atoms``; return the key of the structure it duplicates, or None if it is new."""
        structure = to_structure(atoms)
        fingerprint = rdf_fingerprint(atoms) if self.rdf_prefilter is not None else None
        match = self._find(structure, fingerprint, energy_per_atom)
        if match is not None:
            match.duplicates.append(key)
            return match.key
        formula = structure.composition.reduced_formula
        self._unique.append(_Unique(key, energy_per_atom, structure, formula))
        self._energies.append(np.nan if energy_per_atom is None else float(energy_per_atom))
        self._formula_ids.append(self._formula_index.setdefault(formula, len(self._formula_index)))
        if fingerprint is not None:
            self._fingerprints.append(fingerprint)
        return None

    def find(self, atoms: Atoms, energy_per_atom: float | None = None) -> Hashable | None:
        """Key of the stored structure ``atoms`` duplicates, or None; stores nothing."""
        fingerprint = rdf_fingerprint(atoms) if self.rdf_prefilter is not None else None
        match = self._find(to_structure(atoms), fingerprint, energy_per_atom)
        return None if match is None else match.key

    def _find(self, structure: Structure, fingerprint: np.ndarray | None, energy: float | None) -> _Unique | None:
        candidates = self._prefilter(structure.composition.reduced_formula, fingerprint, energy)
        for k in candidates:
            self.n_matcher_calls += 1
            if self.matcher.fit(structure, self._unique[k].structure):
                return self._unique[k]
        return None

    def _prefilter(self, formula: str, fingerprint: np.ndarray | None, energy: float | None) -> list[int]:
        """Indices of stored structures that may match, most similar RDF first."""
        if not self._unique or formula not in self._formula_index:
            return []
        keep = self._formula_ids.view() == self._formula_index[formula]
        if energy is not None and self.energy_tol is not None:
            # Unknown (NaN) energies cannot rule a match out.
            keep &= ~(np.abs(self._energies.view() - energy) > self.energy_tol)
        order = np.arange(len(self._unique))
        if fingerprint is not None:
            distance = pairwise_pearson(fingerprint[None, :], self._fingerprints.view())[0]
            keep &= distance <= self.rdf_prefilter
            order = np.argsort(distance, kind="stable")
        return [int(k) for k in order if keep[k]]


class _GrowingArray:
    """Rows appended in amortised O(1); ``view()`` is the filled part, no copy."""

    def __init__(self, dtype=float):
        self._data: np.ndarray | None = None
        self._size = 0
        self._dtype = dtype

    def append(self, row) -> None:
        row = np.asarray(row, dtype=self._dtype)
        if self._data is None:
            self._data = np.empty((16, *row.shape), dtype=self._dtype)
        elif self._size == len(self._data):
            self._data = np.concatenate([self._data, np.empty_like(self._data)])
        self._data[self._size] = row
        self._size += 1

    def view(self) -> np.ndarray:
        return self._data[: self._size]


def unique(
    entries: Iterable[tuple[Hashable, Atoms, float | None]],
    dedupe: Deduplicator | None = None,
) -> list[tuple[Hashable, Atoms, float | None]]:
    """Unique ``(key, atoms, energy_per_atom)`` entries, lowest energy first.

    Entries are visited in order of energy (unknown energies last), so each group of
    duplicates is represented by its lowest-energy member.
    """
    dedupe = dedupe if dedupe is not None else Deduplicator()
    ordered = sorted(entries, key=lambda e: (e[2] is None, np.inf if e[2] is None else e[2]))
    return [entry for entry in ordered if dedupe.add(entry[1], entry[2], entry[0]) is None]
