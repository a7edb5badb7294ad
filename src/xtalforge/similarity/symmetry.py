"""Space groups by spglib at a few tolerances.

A relaxed structure that is slightly off a high-symmetry point shows lower symmetry
at a tight tolerance and the high one at a loose tolerance; keeping all of them lets
a reader see how robust the assignment is. The loosest tolerance (0.1 Å by default, as
in AIRSS and most structure-search codes) is "the" space group: relaxations that stop
at fmax = 0.05 eV/Å leave displacements of a few 0.01 Å, which turned a relaxed diamond
into P-1 at 0.01 Å in the active-search validation.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import spglib
from ase import Atoms


@dataclass(frozen=True)
class SpacegroupInfo:
    """Space group at the reference (loosest) tolerance, plus every tolerance tried.

    ``number``/``symbol`` are None only when spglib found no symmetry at any
    tolerance (overlapping atoms, a degenerate cell).
    """

    number: int | None
    symbol: str | None
    symprec: float | None  # the tolerance ``number`` comes from
    per_tolerance: dict[float, tuple[int, str] | None] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``"Fd-3m (227)"``, or ``"?"`` when unknown."""
        return f"{self.symbol} ({self.number})" if self.number is not None else "?"


def spacegroup(atoms: Atoms, symprec: Sequence[float] = (1e-3, 1e-2, 0.1), angle_tolerance: float = -1.0) -> SpacegroupInfo:
    """Space group of ``atoms`` at each tolerance in ``symprec`` (Å).

    The reported one is from the loosest tolerance; if spglib fails there, the next
    looser one that worked is used.
    """
    tolerances = sorted(float(t) for t in symprec)
    if not tolerances:
        raise ValueError("spacegroup needs at least one tolerance")
    cell = (atoms.cell.array, atoms.get_scaled_positions(wrap=True), atoms.numbers)
    found = {t: _spacegroup_at(cell, t, angle_tolerance) for t in tolerances}
    for tolerance in reversed(tolerances):
        hit = found[tolerance]
        if hit is not None:
            return SpacegroupInfo(number=hit[0], symbol=hit[1], symprec=tolerance, per_tolerance=found)
    return SpacegroupInfo(number=None, symbol=None, symprec=None, per_tolerance=found)


def _spacegroup_at(cell, symprec: float, angle_tolerance: float) -> tuple[int, str] | None:
    with warnings.catch_warnings():
        # spglib warns about its old error handling on every failure; a failure is data here.
        warnings.simplefilter("ignore")
        try:
            dataset = spglib.get_symmetry_dataset(cell, symprec=symprec, angle_tolerance=angle_tolerance)
        except spglib.SpglibError:  # with new-style error handling spglib raises instead of returning None
            return None
    if dataset is None:
        return None
    return int(dataset.number), str(dataset.international)
