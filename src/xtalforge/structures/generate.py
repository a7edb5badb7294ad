"""Random candidate structures under constraints: symmetric (PyXtal) or fully random.

Every structure returned satisfies :meth:`Constraints.violations`; constraints that
cannot be met end in a ConstraintError after ``max_attempts`` attempts. Each attempt
draws its own generator from ``rng`` first, so an attempt that consumed an unknown
amount of randomness (a PyXtal call cut off by the time limit) leaves the later ones
unchanged: the same seed gives the same structure unless a time limit fires.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from functools import cache, lru_cache
from itertools import product

import numpy as np
from ase import Atoms
from ase.geometry import cellpar_to_cell
from tqdm.auto import tqdm
from vesin import ase_neighbor_list

from xtalforge.errors import ConfigError, ConstraintError
from xtalforge.structures.composition import Composition
from xtalforge.structures.constraints import Constraints, as_composition, atomic_volume
from xtalforge.timeouts import time_limit as run_time_limit

MODES = ("symmetric", "random")
CELLS = ("conventional", "primitive")
# Primitive basis vectors of each centring, in fractional coordinates of the conventional cell
# (standard settings as PyXtal and ASE use them; R in the hexagonal, obverse setting).
CENTRING_TO_PRIMITIVE = {
    "P": np.eye(3),
    "A": np.array([[1.0, 0.0, 0.0], [0.0, 0.5, -0.5], [0.0, 0.5, 0.5]]),
    "C": np.array([[0.5, -0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]),
    "I": np.array([[-0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.5, 0.5, -0.5]]),
    "F": np.array([[0.0, 0.5, 0.5], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0]]),
    "R": np.array([[2 / 3, 1 / 3, 1 / 3], [-1 / 3, 1 / 3, 1 / 3], [-1 / 3, -2 / 3, 1 / 3]]),
}
ANGLE_RANGE_DEG = (60.0, 120.0)  # cell angles of fully random structures
MIN_CELL_SHAPE_FACTOR = 0.25  # V / (abc) below this is a needle-like cell: redrawn
CELL_DRAWS = 64  # cell shapes drawn at once per random attempt (vectorised rejection)
PLACEMENT_BATCH = 32  # candidate positions tested at once per atom
PLACEMENT_BATCHES = 8  # batches per atom before the attempt is abandoned


class PyxtalTimeout(BaseException):
    """One PyXtal call ran past its time limit.

    A BaseException so that PyXtal's own ``except Exception`` clauses cannot swallow it.
    """


def candidate_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of candidate ``index`` of a run with ``seed``: independent of all other candidates."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


# -- space-group compatibility --------------------------------------------------------


@cache
def _wyckoff_table(
    spacegroup: int,
) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    """Multiplicities (conventional cell) of a group's Wyckoff positions.

    Returns the multiplicities that have a position with free parameters (usable any
    number of times) and, for the others, ``(multiplicity, number of fixed positions)``:
    each fixed position holds one orbit only. Same classification as PyXtal's
    ``Group._get_base_and_upper_bounds``.
    """
    from pyxtal.symmetry import Group

    free, fixed = set(), Counter()
    for wp in Group(spacegroup):
        if wp.get_dof() > 0:
            free.add(wp.multiplicity)
        else:
            fixed[wp.multiplicity] += 1
    return tuple(sorted(free)), tuple(
        sorted((m, n) for m, n in fixed.items() if m not in free)
    )


@lru_cache(maxsize=4096)
def wyckoff_compatible(spacegroup: int, counts: tuple[int, ...]) -> tuple[bool, bool]:
    """Whether atom ``counts`` (one per element) fit on the Wyckoff positions of ``spacegroup``.

    Returns ``(compatible, has_freedom)`` like PyXtal's ``Group.check_compatible``
    (``has_freedom``: some solution uses a position with free parameters), but by
    dynamic programming over the fixed positions used so far instead of enumerating
    every combination, which takes minutes for a hundred atoms or more.
    """
    free, fixed = _wyckoff_table(spacegroup)
    largest = max(counts)
    # reachable[n]: n atoms fit on positions with free parameters alone.
    reachable = np.zeros(largest + 1, dtype=bool)
    reachable[0] = True
    for total in range(1, largest + 1):
        reachable[total] = any(m <= total and reachable[total - m] for m in free)
    multiplicities = [m for m, _ in fixed]
    limits = [n for _, n in fixed]
    # State: fixed positions used per multiplicity, and whether a free one was used.
    states = {(tuple(0 for _ in fixed), False)}
    for count in counts:
        new_states = set()
        for used, freedom in states:
            for take in product(
                *(range(limit - u + 1) for limit, u in zip(limits, used))
            ):
                rest = count - sum(t * m for t, m in zip(take, multiplicities))
                if rest >= 0 and reachable[rest]:
                    new_states.add(
                        (tuple(u + t for u, t in zip(used, take)), freedom or rest > 0)
                    )
        states = new_states
        if not states:
            return False, False
    return True, any(freedom for _, freedom in states)


def _atom_counts(composition: Composition) -> tuple[int, ...]:
    return tuple(n for _, n in composition.counts)


@cache
def centring(spacegroup: int) -> str:
    """The lattice centring letter of a space group in its standard setting (P, A, C, I, F or R)."""
    from ase.spacegroup import Spacegroup

    return Spacegroup(spacegroup).lattice


def lattice_points(spacegroup: int) -> int:
    """Lattice points per conventional cell: how many primitive cells the conventional one holds."""
    return round(1.0 / np.linalg.det(CENTRING_TO_PRIMITIVE[centring(spacegroup)]))


def conventional_counts(spacegroup: int, counts: tuple[int, ...], cell: str) -> tuple[int, ...]:
    """Atom counts PyXtal places in the conventional cell so that the structure has ``counts`` in ``cell``."""
    if cell == "conventional":
        return counts
    return tuple(n * lattice_points(spacegroup) for n in counts)


def compatible_spacegroups(
    composition: Composition | str,
    max_tries: int = 0,
    constraints: Constraints | None = None,
    seed: int = 0,
    pyxtal_timeout_s: float = 10.0,
    cell: str = "conventional",
) -> list[int]:
    """Space groups (1-230) whose Wyckoff positions can hold the composition's atom counts.

    ``cell="conventional"``: the atoms fill the conventional cell of the group.
    ``cell="primitive"``: they fill its primitive cell (a centred conventional cell holds 2, 3
    or 4 times as many), as a crystal's smallest cell does: corundum's ten-atom Al4O6 cell
    exists only in this sense (its conventional R-3c cell holds Al12O18).

    The counting check is exact and cached per composition. With ``max_tries > 0``
    a group is kept only when PyXtal also builds a structure satisfying
    ``constraints`` (default: ``Constraints()``) within ``max_tries`` attempts, so
    groups that are compatible on paper but never produce a valid candidate are
    dropped before a search asks them for pools of candidates.
    """
    composition = as_composition(composition)
    _check_cell(cell)
    groups = _count_compatible(_atom_counts(composition), cell)
    if max_tries <= 0:
        return list(groups)
    constraints = (constraints or Constraints()).resolved(composition)
    kept = []
    for spacegroup in groups:
        try:
            generate_structure(
                composition,
                constraints,
                np.random.default_rng([seed, spacegroup]),
                mode="symmetric",
                spacegroups=[spacegroup],
                max_attempts=max_tries,
                pyxtal_timeout_s=pyxtal_timeout_s,
                cell=cell,
            )
        except ConstraintError:
            continue
        kept.append(spacegroup)
    return kept


@lru_cache(maxsize=256)
def _count_compatible(counts: tuple[int, ...], cell: str = "conventional") -> tuple[int, ...]:
    return tuple(sg for sg in range(1, 231) if wyckoff_compatible(sg, conventional_counts(sg, counts, cell))[0])


def _check_cell(cell: str) -> None:
    if cell not in CELLS:
        raise ConfigError(f"unknown cell {cell!r} for symmetric structures: use one of {', '.join(CELLS)}")


# -- time limit for one PyXtal call ------------------------------------------------------


def time_limit(seconds: float | None):
    """Raise PyxtalTimeout in the calling thread when the block runs longer than ``seconds``."""
    return run_time_limit(seconds, PyxtalTimeout)


# -- generation -----------------------------------------------------------------------


class _Rejected(Exception):
    """One attempt produced no valid structure; ``reason`` says why (tallied for the final error)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def generate_structure(
    composition: Composition | str,
    constraints: Constraints,
    rng: np.random.Generator,
    mode: str = "symmetric",
    spacegroups: list[int] | None = None,
    max_attempts: int = 200,
    pyxtal_timeout_s: float | None = 10.0,
    cell: str = "conventional",
) -> Atoms:
    """One random structure of ``composition`` that satisfies ``constraints``.

    ``mode="symmetric"``: PyXtal places atoms on Wyckoff positions of a space group
    drawn uniformly from ``spacegroups`` (default: all compatible ones); a group whose
    PyXtal call runs past ``pyxtal_timeout_s`` is dropped for the rest of this call;
    ``cell`` says whether the atoms fill the group's conventional or primitive cell
    (see :func:`compatible_spacegroups`).
    ``mode="random"``: a random cell (angles 60-120°) with atoms inserted one by one
    at random positions clear of the minimum distances.
    The result carries ``info["spacegroup"]`` (the generating group; 1 for random)
    and ``info["generator"]`` ("pyxtal" or "random").
    Raises ConstraintError when no valid structure appears in ``max_attempts`` attempts.
    """
    composition = as_composition(composition)
    constraints = constraints.resolved(composition)
    if max_attempts < 1:
        raise ConstraintError(f"max_attempts must be >= 1, got {max_attempts}")
    if mode == "symmetric":
        _check_cell(cell)
        attempt = _SymmetricAttempt(
            composition, constraints, spacegroups, pyxtal_timeout_s, cell
        )
    elif mode == "random":
        attempt = _RandomAttempt(composition, constraints)
    else:
        raise ConfigError(
            f"unknown structure generation mode {mode!r}: use one of {', '.join(MODES)}"
        )
    failures = Counter()
    for _ in range(max_attempts):
        attempt_rng = np.random.default_rng(rng.integers(2**63))
        try:
            atoms = attempt(attempt_rng)
        except _Rejected as rejected:
            failures[rejected.reason] += 1
            continue
        problems = constraints.violations(atoms)
        if not problems:
            return atoms
        failures[f"structure broke a constraint: {problems[0]}"] += (
            1  # not expected: the attempts fit them
        )
    summary = "; ".join(f"{n}× {reason}" for reason, n in failures.most_common(3))
    raise ConstraintError(
        f"no {mode} structure of {composition.formula} met the constraints in {max_attempts} attempts "
        f"({summary}): loosen min_distances, the lattice bounds or volume_per_atom, or raise max_attempts"
    )


def generate_many(
    composition: Composition | str,
    constraints: Constraints,
    n: int,
    seed: int,
    mode: str = "symmetric",
    spacegroups: list[int] | None = None,
    max_attempts: int = 200,
    pyxtal_timeout_s: float | None = 10.0,
    start: int = 0,
    progress: bool = True,
    cell: str = "conventional",
) -> list[Atoms]:
    """Candidates ``start`` .. ``start + n - 1``; candidate i is drawn from ``candidate_rng(seed, i)``."""
    composition = as_composition(composition)
    constraints = constraints.resolved(composition)
    indices = tqdm(
        range(start, start + n),
        desc=f"generating {composition.formula}",
        unit="structure",
        disable=not progress or not sys.stderr.isatty(),
    )
    return [
        generate_structure(
            composition,
            constraints,
            candidate_rng(seed, i),
            mode=mode,
            spacegroups=spacegroups,
            max_attempts=max_attempts,
            pyxtal_timeout_s=pyxtal_timeout_s,
            cell=cell,
        )
        for i in indices
    ]


def _fit_volume(
    atoms: Atoms, constraints: Constraints, rng: np.random.Generator
) -> Atoms:
    """Scale ``atoms`` isotropically to a random volume that keeps every constraint.

    Scaling by s multiplies all distances and lengths by s, so each constraint is an
    interval of s; the volume is drawn uniformly over their intersection.
    """
    n_atoms, volume = len(atoms), atoms.get_volume()
    lengths = atoms.cell.lengths()
    low, high = constraints.volume_range(atoms.numbers)
    lower = max(
        (low * n_atoms / volume) ** (1 / 3), constraints.lattice_min / lengths.min()
    )
    upper = min(
        (high * n_atoms / volume) ** (1 / 3), constraints.lattice_max / lengths.max()
    )
    if lower > upper:
        raise _Rejected(
            "cell shape cannot meet the lattice bounds and volume range together"
        )
    matrix = constraints.min_distance_matrix(atoms.numbers)
    first, second, distance = ase_neighbor_list(
        "ijd", atoms, float(matrix.max()) / lower
    )
    if len(distance):
        lower = max(lower, float(np.max(matrix[first, second] / distance)))
    if lower > upper:
        raise _Rejected(
            "minimum distances need more volume than the range allows for this cell"
        )
    target = rng.uniform(lower**3, upper**3) * volume
    scaled = atoms.copy()
    scaled.set_cell(atoms.cell.array * (target / volume) ** (1 / 3), scale_atoms=True)
    return scaled


class _SymmetricAttempt:
    """One PyXtal structure in a random compatible space group, fitted to the constraints."""

    def __init__(self, composition, constraints, spacegroups, timeout_s, cell="conventional"):
        from pyxtal.tolerance import Tol_matrix

        self.composition = composition
        self.constraints = constraints
        self.counts = _atom_counts(composition)
        self.cell = cell
        self.spacegroups = self._checked_spacegroups(spacegroups)
        self.timeout_s = timeout_s
        elements = composition.elements
        # PyXtal checks pair distances against this matrix while placing orbits.
        self.tolerances = Tol_matrix(
            *[
                (a, b, constraints.min_distance(a, b))
                for i, a in enumerate(elements)
                for b in elements[i:]
            ],
            prototype="atomic",
        )
        # PyXtal draws its volume around factor × (mean of covalent and vdW sphere
        # volumes); aim it at the middle of our volume range.
        low, high = constraints.volume_range(composition.numbers)
        expected = np.mean([atomic_volume(z) for z in composition.numbers])
        self.volume_factor = float((low + high) / 2 / expected)

    def _checked_spacegroups(self, spacegroups) -> list[int]:
        compatible = _count_compatible(self.counts, self.cell)
        if spacegroups is None:
            return list(compatible)
        spacegroups = [int(sg) for sg in spacegroups]
        if not spacegroups:
            raise ConstraintError(
                "spacegroups is an empty list: give at least one, or None for all compatible"
            )
        outside = [sg for sg in spacegroups if not 1 <= sg <= 230]
        if outside:
            raise ConstraintError(
                f"space group {outside[0]} does not exist: use numbers 1-230"
            )
        incompatible = [sg for sg in spacegroups if sg not in compatible]
        if incompatible:
            raise ConstraintError(
                f"space group {incompatible[0]} has no Wyckoff positions for {self.composition.formula} "
                f"in its {self.cell} cell: choose from compatible_spacegroups(composition, cell={self.cell!r})"
            )
        return sorted(set(spacegroups))

    def __call__(self, rng: np.random.Generator) -> Atoms:
        if not self.spacegroups:
            raise ConstraintError(
                f"PyXtal ran past {self.timeout_s} s in every allowed space group of {self.composition.formula}: "
                "raise pyxtal_timeout_s or allow other space groups"
            )
        spacegroup = int(rng.choice(self.spacegroups))
        try:
            crystal = self._pyxtal(spacegroup, rng)
        except PyxtalTimeout:
            # A known PyXtal failure mode: leave this group alone from now on.
            self.spacegroups.remove(spacegroup)
            raise _Rejected("PyXtal ran past the time limit") from None
        except Exception as error:  # noqa: BLE001 (PyXtal fails with assorted exception types)
            raise _Rejected(f"PyXtal failed ({type(error).__name__})") from None
        atoms = crystal.to_ase(resort=False)
        if self.cell == "primitive" and centring(spacegroup) != "P":
            atoms = _primitive_cell(atoms, spacegroup)
        elements = self.composition.elements
        atoms = atoms[
            np.argsort(
                [elements.index(s) for s in atoms.get_chemical_symbols()], kind="stable"
            )
        ]
        atoms.wrap()
        atoms = _fit_volume(atoms, self.constraints, rng)
        atoms.info.update(spacegroup=spacegroup, generator="pyxtal")
        return atoms

    def _pyxtal(self, spacegroup: int, rng: np.random.Generator):
        from pyxtal import pyxtal

        with warnings.catch_warnings(), time_limit(self.timeout_s):
            warnings.simplefilter("ignore")  # PyXtal warns on every volume retry
            crystal = pyxtal()
            crystal.from_random(
                3,
                _pyxtal_group(spacegroup),
                self.composition.elements,
                list(conventional_counts(spacegroup, self.counts, self.cell)),
                factor=self.volume_factor,
                tm=self.tolerances,
                max_count=1,
                random_state=rng,
            )
        return crystal


def _primitive_cell(atoms: Atoms, spacegroup: int) -> Atoms:
    """The primitive cell of a centred conventional cell, Niggli-reduced (one atom per lattice-point orbit)."""
    from ase.build import niggli_reduce

    cell = CENTRING_TO_PRIMITIVE[centring(spacegroup)] @ atoms.cell.array
    fractional = np.linalg.solve(cell.T, atoms.positions.T).T % 1.0
    # Atoms one centring translation apart land on the same fractional position.
    key = np.round(fractional * 1e5).astype(np.int64) % 100000
    _, first = np.unique(key, axis=0, return_index=True)
    first = np.sort(first)
    if len(first) * lattice_points(spacegroup) != len(atoms):
        raise _Rejected("the primitive cell did not hold one atom per lattice-point orbit")
    primitive = Atoms(atoms.numbers[first], scaled_positions=fractional[first], cell=cell, pbc=True)
    niggli_reduce(primitive)
    return primitive


@lru_cache(maxsize=None)
def _pyxtal_group(spacegroup: int):
    """One Group per space group: building it parses every symmetry operation (~0.1 s)."""
    return _fast_check_group_class()(spacegroup)


@lru_cache(maxsize=1)
def _fast_check_group_class() -> type:
    """PyXtal's Group with the compatibility check replaced (built lazily: PyXtal imports slowly)."""
    from pyxtal.symmetry import Group

    class FastCheckGroup(Group):
        """PyXtal's Group, its compatibility check done by :func:`wyckoff_compatible`.

        PyXtal enumerates every Wyckoff combination in its check, which takes minutes
        for compositions of a hundred atoms or more and runs inside every structure it builds.
        """

        def check_compatible(self, numIons, verbose=False):
            return wyckoff_compatible(self.number, tuple(int(n) for n in numIons))

    return FastCheckGroup


class _RandomAttempt:
    """A random cell in the lattice bounds filled atom by atom, each clear of the minimum distances."""

    def __init__(self, composition, constraints):
        self.composition = composition
        self.constraints = constraints
        self.numbers = np.array(composition.numbers)
        self.matrix = constraints.min_distance_matrix(self.numbers)

    def __call__(self, rng: np.random.Generator) -> Atoms:
        cell = self._cell(rng)
        shifts = _image_shifts(cell, float(self.matrix.max()))
        translations = shifts[np.any(shifts != 0, axis=1)] @ cell
        if (
            len(translations)
            and np.linalg.norm(translations, axis=1).min()
            < self.matrix.diagonal().max()
        ):
            raise _Rejected("cell too small for an atom's own periodic image")
        fractional = self._place(cell, shifts, rng)
        atoms = Atoms(
            numbers=self.numbers, scaled_positions=fractional, cell=cell, pbc=True
        )
        atoms.info.update(spacegroup=1, generator="random")
        return atoms

    def _cell(self, rng: np.random.Generator) -> np.ndarray:
        """A cell of random volume in the range, angles in 60-120° and lengths in the bounds."""
        c = self.constraints
        low, high = c.volume_range(self.numbers)
        volume = rng.uniform(low, high) * len(self.numbers)
        angles = rng.uniform(*ANGLE_RANGE_DEG, size=(CELL_DRAWS, 3))
        cosines = np.cos(np.radians(angles))
        shape = 1 - (cosines**2).sum(axis=1) + 2 * cosines.prod(axis=1)  # (V / abc)^2
        raw = rng.uniform(c.lattice_min, c.lattice_max, size=(CELL_DRAWS, 3))
        with np.errstate(invalid="ignore"):
            scale = np.cbrt(
                volume / (raw.prod(axis=1) * np.sqrt(np.clip(shape, 0, None)))
            )
        lengths = raw * scale[:, None]
        good = (
            (shape > MIN_CELL_SHAPE_FACTOR**2)
            & np.all(lengths >= c.lattice_min, axis=1)
            & np.all(lengths <= c.lattice_max, axis=1)
        )
        if not good.any():
            raise _Rejected(
                "no random cell shape fits the lattice bounds at the drawn volume"
            )
        pick = int(np.argmax(good))
        return cellpar_to_cell(np.concatenate([lengths[pick], angles[pick]]))

    def _place(
        self, cell: np.ndarray, shifts: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """Fractional positions, inserted widest-exclusion atoms first."""
        n_atoms = len(self.numbers)
        order = np.lexsort((rng.random(n_atoms), -self.matrix.diagonal()))
        fractional = np.empty((n_atoms, 3))
        placed = []
        for atom in order:
            fractional[atom] = self._insert(atom, placed, fractional, cell, shifts, rng)
            placed.append(atom)
        return fractional

    def _insert(self, atom, placed, fractional, cell, shifts, rng) -> np.ndarray:
        if not placed:
            return rng.random(3)
        others = fractional[placed]
        needed = self.matrix[atom, placed]
        for _ in range(PLACEMENT_BATCHES):
            trial = rng.random((PLACEMENT_BATCH, 3))
            delta = trial[:, None, :] - others[None, :, :]
            delta -= np.round(delta)
            images = (
                delta[:, :, None, :] + shifts[None, None, :, :]
            ) @ cell  # (K, P, S, 3)
            distance = np.sqrt((images**2).sum(axis=-1)).min(axis=-1)  # (K, P)
            clear = np.all(distance >= needed[None, :], axis=1)
            if clear.any():
                return trial[int(np.argmax(clear))]
        raise _Rejected("no room left to insert an atom")


def _image_shifts(cell: np.ndarray, cutoff: float) -> np.ndarray:
    """Integer lattice shifts that reach every image within ``cutoff`` of a wrapped difference.

    A fractional difference in [-0.5, 0.5] plus shift n is within ``cutoff`` only if
    |n_i| <= cutoff / h_i + 0.5, with h_i the spacing of lattice planes i.
    """
    volume = abs(np.linalg.det(cell))
    spacings = volume / np.linalg.norm(
        np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1
    )
    reach = np.floor(cutoff / spacings + 0.5).astype(int)
    axes = [np.arange(-r, r + 1) for r in reach]
    return (
        np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
        .reshape(-1, 3)
        .astype(float)
    )
