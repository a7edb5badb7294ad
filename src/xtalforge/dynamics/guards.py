"""Sanity guards that end a relaxation as failed instead of letting it run away.

Universal potentials have holes: SevenNet-0 relaxes some random candidates into
collapsed structures with energies of -1e14 eV/atom and below. Each guard returns a
one-line reason string when it fires and ``None`` otherwise; the relaxers check them at
every step and stop the structure with status "failed".

Two flavours: numpy/ASE functions for one structure (oracle relaxations, where a guard
costs nothing next to an oracle call) and torch functions over a flat
:class:`~xtalforge.structures.batch.Batch` layout for the batched relaxer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from ase import Atoms
from ase.neighborlist import neighbor_list

# Densest known solids sit well above this (diamond: 5.7 Å³/atom); below it the cell
# has collapsed and neighbour searches would blow up.
MIN_VOLUME_PER_ATOM = 1.0

MinDistances = np.ndarray | Callable[[np.ndarray], np.ndarray] | None


def pair_thresholds(numbers: np.ndarray, min_distances: MinDistances, factor: float, floor: float) -> np.ndarray:
    """Distance below which each atom pair counts as overlapping, (N, N) in Å.

    ``min_distances`` is the per-atom-pair minimum-distance matrix (N, N) of the
    structure-generation constraints (``Constraints.min_distance_matrix(numbers)``) or a
    callable building it from ``numbers``; pairs fail below ``factor`` × that minimum.
    ``floor`` is an absolute limit that always applies (the only one when
    ``min_distances`` is None).
    """
    numbers = np.asarray(numbers)
    n = len(numbers)
    if min_distances is None:
        return np.full((n, n), float(floor))
    matrix = min_distances(numbers) if callable(min_distances) else min_distances
    matrix = np.asarray(matrix, dtype=float)
    if matrix.shape != (n, n):
        raise ValueError(
            f"min_distances has shape {matrix.shape}, expected ({n}, {n}): pass the per-atom-pair "
            "matrix of Constraints.min_distance_matrix(atoms.numbers)"
        )
    return np.maximum(factor * matrix, floor)


def check_close_pairs(atoms: Atoms, thresholds: np.ndarray) -> str | None:
    """Reason string if any pair (periodic images included) is closer than its threshold."""
    if len(atoms) == 0:
        return None
    cutoff = float(thresholds.max())
    i, j, d = neighbor_list("ijd", atoms, cutoff)
    if len(d) == 0:
        return None
    ratio = d / thresholds[i, j]
    worst = int(np.argmin(ratio))
    if ratio[worst] >= 1.0:
        return None
    a, b = int(i[worst]), int(j[worst])
    sym = atoms.get_chemical_symbols()
    return (
        f"atoms {a} ({sym[a]}) and {b} ({sym[b]}) are {d[worst]:.3f} Å apart, below the "
        f"{thresholds[a, b]:.3f} Å limit (overlapping or collapsed structure)"
    )


def check_cell(
    cell: np.ndarray, n_atoms: int, initial_volume: float, max_volume_factor: float, max_lattice_length: float
) -> str | None:
    """Reason string if the cell exploded (volume or a lattice vector too large) or collapsed."""
    cell = np.asarray(cell, dtype=float)
    if not np.all(np.isfinite(cell)):
        return "non-finite cell"
    volume = abs(float(np.linalg.det(cell)))
    if volume > max_volume_factor * initial_volume:
        return (
            f"exploding cell: volume {volume:.1f} Å³ exceeds {max_volume_factor:g} × the initial "
            f"{initial_volume:.1f} Å³"
        )
    if volume < MIN_VOLUME_PER_ATOM * max(n_atoms, 1):
        return f"collapsed cell: volume {volume:.3g} Å³ for {n_atoms} atoms"
    lengths = np.linalg.norm(cell, axis=1)
    if lengths.max() > max_lattice_length:
        return f"exploding cell: lattice vector of {lengths.max():.1f} Å exceeds {max_lattice_length:g} Å"
    return None


def check_values(
    energy: float, forces: np.ndarray, stress: np.ndarray | None, n_atoms: int, energy_bounds
) -> str | None:
    """Reason string if energy/forces/stress are non-finite or the energy per atom is absurd."""
    if not np.isfinite(energy):
        return f"non-finite energy ({energy})"
    if not np.all(np.isfinite(forces)):
        return "non-finite forces"
    if stress is not None and not np.all(np.isfinite(stress)):
        return "non-finite stress"
    per_atom = energy / max(n_atoms, 1)
    low, high = energy_bounds
    if not low <= per_atom <= high:
        return (
            f"energy {per_atom:.4g} eV/atom outside the sanity bounds [{low:g}, {high:g}] "
            "(potential hole or collapsed structure; codes reporting absolute energies need [relax] energy_bounds)"
        )
    return None


# ---------------------------------------------------------------- batched (torch)

_IMAGES = torch.tensor([[a, b, c] for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)], dtype=torch.float64)
_ZERO_IMAGE = 13  # index of (0, 0, 0) in _IMAGES


class PairList:
    """All atom pairs within each structure (i < j, plus i == i for self-images), static.

    Built once per relaxation: the atoms of a structure never change, so its pairs and
    their thresholds do not either. Structures of equal size share one (i, j) template,
    so each group is evaluated as dense (structures, pairs) tensors with no per-pair
    gathers of cells. Atoms of a structure must be contiguous and in order, as in a
    :class:`~xtalforge.structures.batch.Batch`.
    """

    def __init__(self, groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]):
        # each group: (systems (G,), first (p,), second (p,), threshold (G, p))
        self.groups = groups

    @classmethod
    def build(cls, system_idx: torch.Tensor, thresholds: list[np.ndarray]) -> PairList:
        """``thresholds[s]`` is the (n_s, n_s) limit matrix of structure s."""
        device = system_idx.device
        n_atoms = torch.bincount(system_idx, minlength=len(thresholds))
        groups = []
        for n in torch.unique(n_atoms).tolist():
            first, second = torch.triu_indices(n, n, offset=0, device=device)
            systems = torch.nonzero(n_atoms == n).flatten()
            stacked = np.stack([thresholds[k] for k in systems.tolist()])
            limit = torch.as_tensor(stacked, dtype=torch.float64, device=device)[:, first, second]
            groups.append((systems, first, second, limit))
        return cls(groups)

    def compact(self, keep_systems: torch.Tensor, system_map: torch.Tensor) -> PairList:
        """Pairs of the kept structures, renumbered with the old→new system map."""
        groups = []
        for systems, first, second, limit in self.groups:
            keep = keep_systems[systems]
            if keep.any():
                groups.append((system_map[systems[keep]], first, second, limit[keep]))
        return PairList(groups)

    def min_ratio(self, positions: torch.Tensor, cell: torch.Tensor, offsets: torch.Tensor,
                  max_elements: int = 4_000_000) -> torch.Tensor:
        """Per structure, min over pairs of (shortest image distance / threshold), (S,).

        ``offsets[s]`` is the index of structure s's first atom. Minimum image by
        wrapping fractional differences into [-0.5, 0.5) and trying the 27 neighbouring
        images: exact unless a cell is extremely skewed, in which case a close pair can
        be missed but never invented.
        """
        out = torch.full((cell.shape[0],), float("inf"), dtype=positions.dtype, device=positions.device)
        images = _IMAGES.to(cell)
        for systems, first, second, limit in self.groups:
            step = max(1, max_elements // (27 * len(first)))
            for start in range(0, len(systems), step):
                chunk = systems[start:start + step]
                out[chunk] = self._group_min_ratio(positions, cell[chunk], offsets[chunk], first, second,
                                                   limit[start:start + step], images)
        return out

    @staticmethod
    def _group_min_ratio(positions, cell, offsets, first, second, limit, images) -> torch.Tensor:
        delta = positions[offsets[:, None] + second] - positions[offsets[:, None] + first]  # (G, p, 3)
        frac = delta @ torch.linalg.inv(cell)
        wrapped = (frac - torch.round(frac)) @ cell  # (G, p, 3)
        dist2 = (wrapped**2).sum(-1)
        dist2[:, first == second] = torch.inf  # an atom is not its own neighbour (images below)
        ratio = (dist2 / limit**2).amin(dim=1)
        # Any other image lies at least half the thinnest cell width away: only cells
        # thinner than twice the largest limit need their 27 images searched.
        thin = 0.5 * _cell_widths(cell).amin(dim=1) < limit.amax(dim=1)
        if thin.any():
            w = wrapped[thin]
            image_vectors = images @ cell[thin]  # (T, 27, 3)
            # |w + nC|² = |w|² + 2 w·(nC) + |nC|²: one batched matmul.
            image_dist2 = ((w**2).sum(-1, keepdim=True) + 2.0 * w @ image_vectors.transpose(1, 2)
                           + (image_vectors**2).sum(-1)[:, None, :])  # (T, p, 27)
            image_dist2[:, first == second, _ZERO_IMAGE] = torch.inf
            ratio[thin] = (image_dist2.amin(dim=2).clamp_min(0.0) / limit[thin] ** 2).amin(dim=1)
        return ratio.sqrt()


def _cell_widths(cell: torch.Tensor) -> torch.Tensor:
    """Distances between opposite faces of each cell, (S, 3)."""
    volume = torch.linalg.det(cell).abs()
    cross = torch.linalg.cross(cell[:, [1, 2, 0]], cell[:, [2, 0, 1]])
    return volume[:, None] / torch.linalg.norm(cross, dim=-1)


def batched_cell_reasons(
    cell: torch.Tensor,
    n_atoms: torch.Tensor,
    initial_volume: torch.Tensor,
    max_volume_factor: float,
    max_lattice_length: float,
) -> list[tuple[torch.Tensor, str]]:
    """(mask over structures, reason) pairs for exploded or collapsed cells."""
    volume = torch.linalg.det(cell).abs()
    longest = torch.linalg.norm(cell, dim=-1).amax(dim=-1)
    finite = torch.isfinite(cell).flatten(1).all(dim=1)
    return [
        (~finite, "non-finite cell"),
        (finite & (volume > max_volume_factor * initial_volume),
         f"exploding cell: volume exceeds {max_volume_factor:g} × the initial one"),
        (finite & (volume < MIN_VOLUME_PER_ATOM * n_atoms), "collapsed cell"),
        (finite & (longest > max_lattice_length), f"exploding cell: lattice vector longer than {max_lattice_length:g} Å"),
    ]
