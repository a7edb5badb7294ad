"""Constraints on generated candidate structures (seed 004, Table I).

A candidate must keep every pair of atoms a and b at least ``d_ab`` apart (periodic
images included), have lattice-vector lengths in ``[lattice_min, lattice_max]`` and a
volume per atom inside ``volume_per_atom``. Defaults: ``d_ab = min_distance_scale ×
(r_cov(a) + r_cov(b))`` and a volume range of ``volume_scale_range ×`` the mean atomic
volume of the composition (see :func:`atomic_volume`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
from ase.data import atomic_numbers, chemical_symbols, covalent_radii, vdw_radii
from vesin import ase_neighbor_list

from xtalforge.errors import ConstraintError
from xtalforge.structures.composition import Composition

if TYPE_CHECKING:
    from ase import Atoms

    from xtalforge.config import StructuresConfig

# Densest packing of equal spheres (Kepler): bounds the volume a set of exclusion
# spheres needs. With unequal spheres denser packings exist, so we then use 1.
KEPLER_DENSITY = math.pi / math.sqrt(18.0)
# Elements without a tabulated van der Waals radius get this multiple of r_cov
# (typical vdW/covalent ratios are 1.3-1.9).
VDW_TO_COVALENT_FALLBACK = 1.5
# Round-off allowance when checking a structure that was scaled onto a bound.
DISTANCE_TOLERANCE = 1e-8  # Å
RELATIVE_TOLERANCE = 1e-9


def atomic_volume(number: int) -> float:
    """Volume estimate of one atom in a solid, Å^3.

    The mean of the covalent-radius and van der Waals-radius sphere volumes: PyXtal's
    expected volume per atom. Over the reference crystals (Si polymorphs, NaCl,
    GaAs, Al2O3, Mg2SiO4, SnSe) the true volume per atom is 0.64-1.32 times this.
    """
    r_cov = covalent_radii[number]
    r_vdw = vdw_radii[number]
    if not np.isfinite(r_vdw):
        r_vdw = VDW_TO_COVALENT_FALLBACK * r_cov
    return float(4.0 / 3.0 * math.pi * (r_cov**3 + r_vdw**3) / 2.0)


def parse_pair(key: str | tuple[str, str]) -> tuple[str, str]:
    """``"Si-Si"`` or ``("Na", "Cl")`` -> a pair of element symbols, checked."""
    if isinstance(key, str):
        parts = tuple(p.strip() for p in key.split("-"))
    else:
        parts = tuple(key)
    if len(parts) != 2:
        raise ConstraintError(
            f"min_distances key {key!r} is not a pair: write it as 'A-B', e.g. 'Na-Cl'"
        )
    for symbol in parts:
        if symbol not in atomic_numbers or symbol == "X":
            raise ConstraintError(
                f"min_distances key {key!r} names unknown element {symbol!r}: check the symbol"
            )
    return parts[0], parts[1]


def as_composition(composition: Composition | str) -> Composition:
    return (
        composition
        if isinstance(composition, Composition)
        else Composition.parse(composition)
    )


@dataclass
class Constraints:
    """Minimum pair distances, lattice-length bounds and volume-per-atom range.

    ``min_distances`` holds overrides per element pair (symmetric; keys may be
    ``("Na", "Cl")`` or ``"Na-Cl"``); other pairs default to ``min_distance_scale``
    × the sum of covalent radii. ``volume_per_atom = None`` means
    ``volume_scale_range`` × the structure's mean :func:`atomic_volume`.
    :meth:`from_config` / :meth:`resolved` write every value out explicitly.
    """

    min_distances: dict[tuple[str, str], float] = field(default_factory=dict)
    lattice_min: float = 2.0
    lattice_max: float = 15.0
    volume_per_atom: tuple[float, float] | None = None
    min_distance_scale: float = 0.7
    volume_scale_range: tuple[float, float] = (0.6, 1.5)

    def __post_init__(self) -> None:
        pairs = {}
        for key, value in dict(self.min_distances).items():
            a, b = parse_pair(key)
            distance = _positive(value, f"min_distances[{a}-{b}]")
            if pairs.get((a, b), distance) != distance:
                raise ConstraintError(
                    f"min_distances gives {a}-{b} twice with different values: keep one"
                )
            pairs[(a, b)] = pairs[(b, a)] = distance
        self.min_distances = pairs
        self.lattice_min = _positive(self.lattice_min, "lattice_min")
        self.lattice_max = _positive(self.lattice_max, "lattice_max")
        if self.lattice_min > self.lattice_max:
            raise ConstraintError(
                f"lattice_min {self.lattice_min} Å is larger than lattice_max {self.lattice_max} Å: swap or widen them"
            )
        self.min_distance_scale = _positive(
            self.min_distance_scale, "min_distance_scale"
        )
        self.volume_scale_range = _range(self.volume_scale_range, "volume_scale_range")
        if self.volume_per_atom is not None:
            self.volume_per_atom = _range(self.volume_per_atom, "volume_per_atom")

    @classmethod
    def from_config(
        cls, composition: Composition | str, config: StructuresConfig
    ) -> Constraints:
        """Constraints for ``composition`` from the ``[structures]`` config section, resolved and checked."""
        constraints = cls(
            min_distances=dict(config.min_distances),
            lattice_min=config.lattice_min,
            lattice_max=config.lattice_max,
            volume_per_atom=None
            if config.volume_per_atom is None
            else tuple(config.volume_per_atom),
            min_distance_scale=config.min_distance_scale,
            volume_scale_range=tuple(config.volume_scale_range),
        )
        return constraints.resolved(composition)

    def resolved(self, composition: Composition | str) -> Constraints:
        """A copy with every pair distance and the volume range of ``composition`` explicit.

        Raises ConstraintError when no structure of ``composition`` can satisfy them.
        """
        composition = as_composition(composition)
        elements = composition.elements
        pairs = dict(self.min_distances)
        for a in elements:
            for b in elements:
                pairs[(a, b)] = self.min_distance(a, b)
        resolved = replace(
            self,
            min_distances=pairs,
            volume_per_atom=self.volume_range(composition.numbers),
        )
        resolved.check_feasible(composition)
        return resolved

    # -- values -----------------------------------------------------------------

    def min_distance(self, a: str, b: str) -> float:
        """Minimum allowed distance between elements ``a`` and ``b``, Å."""
        if (a, b) in self.min_distances:
            return self.min_distances[(a, b)]
        return float(
            self.min_distance_scale
            * (covalent_radii[atomic_numbers[a]] + covalent_radii[atomic_numbers[b]])
        )

    def min_distance_matrix(self, numbers) -> np.ndarray:
        """(N, N) matrix of minimum distances between the atoms with atomic ``numbers``."""
        numbers = np.asarray(numbers, dtype=int)
        species, inverse = np.unique(numbers, return_inverse=True)
        symbols = [chemical_symbols[z] for z in species]
        per_species = np.array(
            [[self.min_distance(a, b) for b in symbols] for a in symbols], dtype=float
        )
        inverse = inverse.reshape(-1)
        return per_species[inverse[:, None], inverse[None, :]]

    def volume_range(self, numbers) -> tuple[float, float]:
        """Allowed volume per atom (Å^3) for a structure with atomic ``numbers``."""
        if self.volume_per_atom is not None:
            return self.volume_per_atom
        mean_volume = float(
            np.mean([atomic_volume(z) for z in np.asarray(numbers, dtype=int)])
        )
        low, high = self.volume_scale_range
        return low * mean_volume, high * mean_volume

    # -- feasibility of the constraints themselves ------------------------------------

    def check_feasible(self, composition: Composition | str) -> None:
        """Raise ConstraintError when no structure of ``composition`` can satisfy the constraints.

        Necessary conditions only: an atom's periodic image is one lattice vector
        away, the cell volume is at most ``lattice_max``^3, and atoms surrounded by
        non-overlapping exclusion spheres need a minimum volume.
        """
        composition = as_composition(composition)
        elements = composition.elements
        self_distance, widest = max((self.min_distance(a, a), a) for a in elements)
        if self_distance > self.lattice_max:
            raise ConstraintError(
                f"lattice_max {self.lattice_max} Å is below the {widest}-{widest} minimum distance "
                f"{self_distance} Å (an atom's periodic image is one lattice vector away): raise lattice_max"
            )
        n_atoms = composition.n_atoms
        low, high = self.volume_range(composition.numbers)
        if low * n_atoms > self.lattice_max**3 * (1 + RELATIVE_TOLERANCE):
            raise ConstraintError(
                f"{n_atoms} atoms at >= {low:.3g} Å^3/atom need {low * n_atoms:.4g} Å^3, more than a cell with "
                f"lattice vectors <= lattice_max {self.lattice_max} Å holds ({self.lattice_max**3:.4g} Å^3): "
                "raise lattice_max or lower volume_per_atom"
            )
        # Sphere radius r_a = min_b d_ab / 2 keeps every pair's spheres disjoint.
        radii = {
            a: min(self.min_distance(a, b) for b in elements) / 2.0 for a in elements
        }
        density = KEPLER_DENSITY if len(set(radii.values())) == 1 else 1.0
        needed = (
            sum(n * 4.0 / 3.0 * math.pi * radii[a] ** 3 for a, n in composition.counts)
            / density
        )
        if needed > high * n_atoms * (1 + RELATIVE_TOLERANCE):
            raise ConstraintError(
                f"the minimum distances need at least {needed / n_atoms:.3g} Å^3/atom but volume_per_atom allows "
                f"at most {high:.3g} Å^3/atom for {composition.formula}: raise volume_per_atom or lower min_distances"
            )

    # -- checking a structure ----------------------------------------------------

    def violations(self, atoms: Atoms) -> list[str]:
        """Every constraint ``atoms`` breaks, one line each; empty when it satisfies all of them."""
        if not np.all(atoms.pbc):
            return ["structure is not periodic in all three directions"]
        positions = atoms.get_positions()
        volume = abs(float(np.linalg.det(atoms.cell.array)))
        if not np.all(np.isfinite(positions)) or not np.all(
            np.isfinite(atoms.cell.array)
        ):
            return ["positions or cell contain non-finite values"]
        if volume < 1e-9:
            return ["cell volume is zero"]
        problems = self._lattice_violations(atoms.cell.lengths())
        low, high = self.volume_range(atoms.numbers)
        per_atom = volume / len(atoms)
        if per_atom < low * (1 - RELATIVE_TOLERANCE) or per_atom > high * (
            1 + RELATIVE_TOLERANCE
        ):
            problems.append(
                f"volume {per_atom:.3f} Å^3/atom is outside [{low:.3f}, {high:.3f}]"
            )
        return problems + self._distance_violations(atoms)

    def is_valid(self, atoms: Atoms) -> bool:
        return not self.violations(atoms)

    def _lattice_violations(self, lengths: np.ndarray) -> list[str]:
        problems = []
        for name, length in zip("abc", lengths):
            if length < self.lattice_min - DISTANCE_TOLERANCE:
                problems.append(
                    f"lattice vector {name} = {length:.3f} Å is shorter than lattice_min {self.lattice_min} Å"
                )
            elif length > self.lattice_max + DISTANCE_TOLERANCE:
                problems.append(
                    f"lattice vector {name} = {length:.3f} Å is longer than lattice_max {self.lattice_max} Å"
                )
        return problems

    def _distance_violations(self, atoms: Atoms) -> list[str]:
        """Pairs closer than their minimum, periodic images (of the atom itself too) included."""
        matrix = self.min_distance_matrix(atoms.numbers)
        first, second, distance = ase_neighbor_list("ijd", atoms, float(matrix.max()))
        too_close = distance < matrix[first, second] - DISTANCE_TOLERANCE
        if not too_close.any():
            return []
        numbers = atoms.numbers
        low_z = np.minimum(numbers[first[too_close]], numbers[second[too_close]])
        high_z = np.maximum(numbers[first[too_close]], numbers[second[too_close]])
        close = distance[too_close]
        problems = []
        # One line per offending element pair (a handful at most), reporting the closest.
        for z1, z2 in sorted(set(zip(low_z.tolist(), high_z.tolist()))):
            mask = (low_z == z1) & (high_z == z2)
            a, b = chemical_symbols[z1], chemical_symbols[z2]
            problems.append(
                f"{a}-{b} distance {close[mask].min():.3f} Å is below the minimum {self.min_distance(a, b):.3f} Å "
                f"({int(mask.sum()) // 2} pairs)"  # the neighbour list holds each pair twice
            )
        return problems


def _positive(value, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConstraintError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ConstraintError(
            f"{name} must be a positive number of Å (or Å^3), got {value!r}"
        )
    return number


def _range(values, name: str) -> tuple[float, float]:
    try:
        low, high = values
    except (TypeError, ValueError):
        raise ConstraintError(
            f"{name} must be two numbers [low, high], got {values!r}"
        ) from None
    low, high = _positive(low, f"{name} low end"), _positive(high, f"{name} high end")
    if low > high:
        raise ConstraintError(
            f"{name} low end {low} is above its high end {high}: write [low, high]"
        )
    return low, high
