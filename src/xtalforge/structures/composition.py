"""Parse chemical compositions such as ``Si16``, ``Na8Cl8`` or ``Mg2SiO4``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from math import gcd
from functools import reduce

from ase.data import atomic_numbers

from xtalforge.errors import CompositionError

MAX_ATOMS = 200
_TOKEN = re.compile(r"([A-Z][a-z]?)(-?\d*)")


@dataclass(frozen=True)
class Composition:
    """Element counts of one simulation cell, in order of first appearance."""

    counts: tuple[tuple[str, int], ...]

    @classmethod
    def parse(cls, text: str, formula_units: int = 1) -> "Composition":
        """Parse ``text`` and multiply every count by ``formula_units``.

        ``Composition.parse("Al2O3", formula_units=2)`` is Al4O6.
        """
        if not isinstance(text, str) or not text.strip():
            raise CompositionError("empty composition: give a formula such as 'Si8' or 'Na4Cl4'")
        if formula_units < 1:
            raise CompositionError(f"formula-unit count must be >= 1, got {formula_units}")
        text = text.strip().replace(" ", "")
        pos, counts = 0, {}
        for match in _TOKEN.finditer(text):
            if match.start() != pos:
                break
            symbol, number = match.groups()
            counts[symbol] = counts.get(symbol, 0) + _count(symbol, number, text)
            pos = match.end()
        if pos != len(text) or not counts:
            raise CompositionError(
                f"cannot parse composition {text!r} at position {pos}: "
                "write element symbols followed by counts, e.g. 'Mg2SiO4'"
            )
        comp = cls(tuple((el, n * formula_units) for el, n in counts.items()))
        if comp.n_atoms > MAX_ATOMS:
            raise CompositionError(
                f"composition {comp.formula} has {comp.n_atoms} atoms; at most {MAX_ATOMS} are "
                "supported: use fewer formula units"
            )
        return comp

    @property
    def elements(self) -> list[str]:
        return [el for el, _ in self.counts]

    @property
    def numbers(self) -> list[int]:
        """Atomic numbers of every atom, grouped by element."""
        return [atomic_numbers[el] for el, n in self.counts for _ in range(n)]

    @property
    def symbols(self) -> list[str]:
        return [el for el, n in self.counts for _ in range(n)]

    @property
    def n_atoms(self) -> int:
        return sum(n for _, n in self.counts)

    @property
    def formula(self) -> str:
        return "".join(f"{el}{n}" for el, n in self.counts)

    @property
    def reduced(self) -> tuple["Composition", int]:
        """Reduced composition and the number of formula units."""
        z = reduce(gcd, (n for _, n in self.counts))
        return Composition(tuple((el, n // z) for el, n in self.counts)), z

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def __str__(self) -> str:
        return self.formula


def _count(symbol: str, number: str, text: str) -> int:
    if symbol not in atomic_numbers or symbol == "X":
        raise CompositionError(f"unknown element {symbol!r} in composition {text!r}: check the symbol's case and spelling")
    if number == "":
        return 1
    value = int(number)
    if value <= 0:
        raise CompositionError(f"count of {symbol} in {text!r} is {value}: counts must be positive integers")
    return value
