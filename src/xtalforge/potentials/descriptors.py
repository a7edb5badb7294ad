"""Atom-centred symmetry functions (Behler–Parrinello) on a flat batch of structures.

Radial functions (Behler's G2), one block per neighbour element B::

    G2_i(η, Rs; B) = Σ_{j∈B} exp(-η (r_ij - Rs)²) fc(r_ij)

Angular functions, one block per unordered pair of neighbour elements {B, C}, summed over
ordered neighbour pairs j ≠ k with {Z_j, Z_k} = {B, C}::

    G_i(η, λ, ζ; B, C) = 2^(1-ζ) Σ_{j≠k} (1 + λ cos θ_ijk)^ζ exp(-η (r_ij² + r_ik² [+ r_jk²]))
                         fc(r_ij) fc(r_ik) [fc(r_jk)]

``angular="g4"`` keeps the bracketed r_jk terms (Behler's G4) and sums over explicit
triplets; ``angular="g5"`` (the default) drops them (Behler's G5, the "wide" angular
function).  Without the r_jk terms the triplet sum factorises exactly: for integer ζ,
(1 + λ cos θ)^ζ is a polynomial in cos θ = u_ij·u_ik, and Σ_{j,k} w_j w_k (u_j·u_k)^n =
Σ_{|α|=n} M_α M_α with per-atom moments M_α = Σ_j w_j Ỹ_α(u_j) of the scaled monomials
Ỹ_α(u) = sqrt(n!/(a!b!c!)) u_x^a u_y^b u_z^c.  The cost is then linear in the neighbour count
instead of quadratic (~45 neighbours within 6 Å in a solid, ~1000 triplets per atom), which is
what makes the potential cheap enough to replace the oracle in relaxations of large pools.

With the default parameters (SIMPLE-NN's, the code of seed 000) there are 8 radial and 18
angular (3 η × ζ ∈ {1, 2, 4} × λ = ±1) components per element pair: 8·E + 18·E(E+1)/2
inputs for E elements (26, 70, 132, 212 for 1–4 elements, as in seed 000).

Neighbours are stored as a dense, padded matrix per atom, grouped by neighbour element
(:class:`NeighbourGraph`), so moments and their gradients are batched matrix products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations_with_replacement, pairwise

import numpy as np
import torch
from torch import nn

# SIMPLE-NN's default parameter set (seed 000 uses SIMPLE-NN with 8 radial + 18 angular).
DEFAULT_RADIAL_ETA = (0.003214, 0.035711, 0.071421, 0.124987, 0.214264, 0.357106, 0.714213, 1.428426)
DEFAULT_ANGULAR_ETA = (0.000357, 0.028569, 0.089277)
DEFAULT_ZETA = (1, 2, 4)
DEFAULT_LAMBDA = (-1, 1)


# --------------------------------------------------------------------------- neighbours


def _segment_offsets(widths) -> tuple[int, ...]:
    return tuple(int(x) for x in np.concatenate([[0], np.cumsum(widths)]))


@dataclass
class NeighbourGraph:
    """Full neighbour lists of a flat batch, as a padded matrix (atom, slot).

    The slots of every atom are grouped by neighbour element: slots ``segments[e]`` to
    ``segments[e+1] - 1`` hold the neighbours of element e, each group as wide as the most
    neighbours of that element any atom has (a per-element width: in Mg-Si-O, few Si
    neighbours do not cost as many slots as the many O neighbours).  ``vec[i, s]`` is
    r_j - r_i (+ lattice shift) of the neighbour j in slot s of atom i; unused slots hold a
    vector of length 2·cutoff (zero weight) and ``neighbour`` = i.  Every pair appears twice
    (i→j and j→i), which is what per-atom sums need.
    """

    vec: torch.Tensor  # (N, W, 3) model dtype
    neighbour: torch.Tensor  # (N, W) int64
    element: torch.Tensor  # (N,) int64 index into the model's elements
    system_idx: torch.Tensor  # (N,) int64
    volume: torch.Tensor  # (S,) Å³, NaN where a structure is not periodic in all directions
    n_systems: int
    cutoff: float
    segments: tuple[int, ...] = (0,)  # E + 1 slot offsets, one group of slots per neighbour element
    n_slots: torch.Tensor | None = None  # (N, E) neighbours of each element per atom

    @property
    def n_atoms(self) -> int:
        return int(self.vec.shape[0])

    @property
    def n_elements(self) -> int:
        return len(self.segments) - 1

    @property
    def width(self) -> int:
        """Slots per atom (all elements together)."""
        return int(self.vec.shape[1])

    @property
    def widths(self) -> tuple[int, ...]:
        """Slots per neighbour element."""
        return tuple(b - a for a, b in pairwise(self.segments))

    def slot_element(self) -> torch.Tensor:
        """(W,) int64: the neighbour element each slot holds."""
        widths = torch.tensor(self.widths, device=self.vec.device)
        return torch.repeat_interleave(torch.arange(self.n_elements, device=self.vec.device), widths)

    def valid(self) -> torch.Tensor:
        """(N, W) bool: slots holding a real neighbour."""
        return torch.linalg.vector_norm(self.vec, dim=-1) < self.cutoff

    def atoms_by_element(self, n_elements: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Atom indices grouped by element, and the permutation back to atom order."""
        if n_elements == 1:
            return [slice(None)], None
        order = torch.argsort(self.element, stable=True)
        counts = torch.bincount(self.element, minlength=n_elements).tolist()
        groups = list(order.split(counts))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return groups, inverse

    def atom_slice(self, start: int, stop: int) -> NeighbourGraph:
        """The rows of atoms start..stop-1 (neighbour indices stay global), trimmed to the
        slots these atoms use: one crowded structure does not widen every chunk of a batch."""
        rows = NeighbourGraph(
            self.vec[start:stop], self.neighbour[start:stop], self.element[start:stop], self.system_idx[start:stop],
            self.volume, self.n_systems, self.cutoff, self.segments,
            None if self.n_slots is None else self.n_slots[start:stop],
        )
        if rows.n_slots is None or stop <= start:
            return rows
        return rows.padded(tuple(int(w) for w in rows.n_slots.max(dim=0).values.tolist()))

    def with_vec(self, vec: torch.Tensor) -> NeighbourGraph:
        return NeighbourGraph(vec, self.neighbour, self.element, self.system_idx, self.volume, self.n_systems,
                              self.cutoff, self.segments, self.n_slots)

    def to(self, device=None, dtype=None) -> NeighbourGraph:
        return NeighbourGraph(
            self.vec.to(device=device, dtype=dtype), self.neighbour.to(device), self.element.to(device),
            self.system_idx.to(device), self.volume.to(device=device, dtype=dtype), self.n_systems, self.cutoff,
            self.segments, None if self.n_slots is None else self.n_slots.to(device),
        )

    def padded(self, widths) -> NeighbourGraph:
        """The same graph with ``widths[e]`` slots for neighbour element e (an int: for every
        element); slots are dropped from the end of a group only where no atom uses them."""
        if isinstance(widths, int):
            widths = (widths,) * self.n_elements
        widths = tuple(int(w) for w in widths)
        if widths == self.widths:
            return self
        n = self.n_atoms
        segments = _segment_offsets(widths)
        vec = self.vec.new_zeros(n, segments[-1], 3)
        vec[..., 0] = 2.0 * self.cutoff
        neighbour = torch.arange(n, device=self.neighbour.device)[:, None].expand(n, segments[-1]).clone()
        for e, (old, new) in enumerate(zip(self.widths, widths)):
            keep = min(old, new)
            a, b = self.segments[e], segments[e]
            vec[:, b:b + keep] = self.vec[:, a:a + keep]
            neighbour[:, b:b + keep] = self.neighbour[:, a:a + keep]
        return NeighbourGraph(vec, neighbour, self.element, self.system_idx, self.volume, self.n_systems, self.cutoff,
                              segments, self.n_slots)

    @staticmethod
    def concat(graphs: list[NeighbourGraph]) -> NeighbourGraph:
        """One graph of several (indices offset, per-element widths padded to the largest)."""
        widths = tuple(int(w) for w in np.max([g.widths for g in graphs], axis=0))
        graphs = [g.padded(widths) for g in graphs]
        atom_offsets = np.cumsum([0] + [g.n_atoms for g in graphs[:-1]])
        sys_offsets = np.cumsum([0] + [g.n_systems for g in graphs[:-1]])
        return NeighbourGraph(
            vec=torch.cat([g.vec for g in graphs]),
            neighbour=torch.cat([g.neighbour + int(o) for g, o in zip(graphs, atom_offsets)]),
            element=torch.cat([g.element for g in graphs]),
            system_idx=torch.cat([g.system_idx + int(o) for g, o in zip(graphs, sys_offsets)]),
            volume=torch.cat([g.volume for g in graphs]),
            n_systems=int(sum(g.n_systems for g in graphs)),
            cutoff=graphs[0].cutoff,
            segments=graphs[0].segments,
            n_slots=None if any(g.n_slots is None for g in graphs) else torch.cat([g.n_slots for g in graphs]),
        )


def _find_neighbours(positions: np.ndarray, cell: np.ndarray, pbc, cutoff: float):
    """Raw (centre, neighbour, lattice images, distances) of one structure, sorted by centre.

    pymatgen's cell-list search (C, ships with pymatgen) is several times faster than
    vesin's or matscipy's for the small periodic cells of structure search, where most of the
    ~45 neighbours within 6 Å are periodic images.
    """
    from pymatgen.optimization.neighbors import find_points_in_spheres

    if not pbc.all() and abs(np.linalg.det(cell)) < 1e-8:
        cell = np.eye(3)  # open boundaries: the lattice only sets the search grid, shifts stay 0
    return find_points_in_spheres(positions, positions, float(cutoff), pbc.astype(np.int64), cell, tol=1e-8)


def neighbour_pairs(positions: np.ndarray, cell: np.ndarray, pbc, cutoff: float):
    """Full neighbour list (i, j, r_j - r_i + lattice shift) of one structure, sorted by i."""
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    starts = np.array([0, len(positions)])
    cells = np.ascontiguousarray(cell, dtype=np.float64)[None]
    centre, neighbour, vectors, kept = _batch_pairs(positions, cells, np.asarray(pbc, dtype=bool)[None], starts, cutoff)
    centre, neighbour, vectors = centre[kept], neighbour[kept], vectors[kept]
    if len(centre) > 1 and np.any(centre[1:] < centre[:-1]):
        order = np.argsort(centre, kind="stable")
        centre, neighbour, vectors = centre[order], neighbour[order], vectors[order]
    return centre, neighbour, vectors


def _batch_pairs(positions: np.ndarray, cells: np.ndarray, pbc: np.ndarray, starts: np.ndarray, cutoff: float):
    """Every pair the per-structure searches find: centre and neighbour (batch indices),
    r_j - r_i + lattice shift (float64, and a last row (2·cutoff, 0, 0): what empty slots hold),
    and the indices of the real pairs among them (not an atom with itself, closer than the cutoff).

    Nothing is compressed or sorted here: the slots are filled by one gather at the end.
    """
    found = []
    for s, (a, b) in enumerate(pairwise(starts)):
        centre, neighbour, images, distances = _find_neighbours(positions[a:b], cells[s], pbc[s], cutoff)
        if a:
            centre += a
            neighbour += a
        found.append((centre, neighbour, images @ cells[s], distances))
    if len(found) == 1:
        centre, neighbour, shifts, distances = found[0]
    elif found:
        centre, neighbour, shifts, distances = (np.concatenate(parts) for parts in zip(*found))
    else:
        centre = neighbour = np.zeros(0, dtype=np.int64)
        shifts, distances = np.zeros((0, 3)), np.zeros(0)
    # Pair vectors in float64 (differences of large coordinates lose digits in float32).
    vectors = np.empty((len(centre) + 1, 3))
    np.add(shifts, np.take(positions, neighbour, axis=0), out=vectors[:-1])
    vectors[:-1] -= np.take(positions, centre, axis=0)
    vectors[-1] = (2.0 * cutoff, 0.0, 0.0)
    kept = np.flatnonzero((distances > 1e-8) & (distances < cutoff))
    return centre.astype(np.int64, copy=False), neighbour.astype(np.int64, copy=False), vectors, kept


_MALLOC_TUNED = False


def _keep_freed_memory() -> None:
    """Let glibc's malloc keep freed blocks of up to 32 MiB for reuse (once per process).

    An evaluation allocates and frees arrays of ~0.1-5 MB (pair lists, per-slot arrays).
    By default glibc hands blocks of that size back to the kernel (mmap/munmap, heap
    trimming), and touching them again costs a page fault per 4 kB page: measured as a
    fifth of the time of a batched evaluation and a tenth of a 100-atom one.  Raising the
    mmap and trim thresholds keeps those pages in the process.  Settings a user made
    through glibc's environment variables are left alone; a no-op off glibc.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    import os
    import platform

    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")) or \
            "malloc" in os.environ.get("GLIBC_TUNABLES", "") or platform.libc_ver()[0] != "glibc":
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 128 << 20)


def build_graph(batch, cutoff: float, element_lookup: torch.Tensor, n_elements: int, dtype=torch.float64) -> NeighbourGraph:
    """Neighbour graph of a :class:`~xtalforge.structures.batch.Batch` (one neighbour search per structure).

    Index work is done in numpy: for one structure it is several times cheaper than torch's
    per-operation overhead.
    """
    _keep_freed_memory()
    positions = np.ascontiguousarray(batch.positions.detach().to("cpu", torch.float64).numpy())
    cells = np.ascontiguousarray(batch.cell.detach().to("cpu", torch.float64).numpy())
    pbc = batch.pbc.cpu().numpy()
    system_idx = batch.system_idx.cpu().numpy()
    n_atoms, n_systems = len(positions), batch.n_systems
    if n_atoms > 1 and np.any(system_idx[1:] < system_idx[:-1]):
        raise ValueError("batch atoms must be grouped by structure (system_idx non-decreasing)")
    element = _element_index(batch.numbers.cpu().numpy(), element_lookup.cpu().numpy())
    starts = np.zeros(n_systems + 1, dtype=np.int64)
    np.cumsum(np.bincount(system_idx, minlength=n_systems), out=starts[1:])
    centre, neighbour, vectors, kept = _batch_pairs(positions, cells, pbc, starts, cutoff)
    numpy_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    vec_pad, neighbour_pad, n_slots, segments = _pad(centre, neighbour, vectors.astype(numpy_dtype, copy=False), kept,
                                                     element, n_atoms, n_elements)
    volume = np.abs(np.linalg.det(cells)) if n_systems else np.zeros(0)
    volume = np.where(pbc.all(axis=1), volume, np.nan) if n_systems else volume
    device = batch.positions.device
    return NeighbourGraph(
        vec=torch.from_numpy(vec_pad).to(device=device, dtype=dtype),
        neighbour=torch.from_numpy(neighbour_pad).to(device),
        element=torch.from_numpy(element).to(device),
        system_idx=batch.system_idx.to(device),
        volume=torch.from_numpy(volume).to(device=device, dtype=dtype),
        n_systems=n_systems,
        cutoff=float(cutoff),
        segments=segments,
        n_slots=torch.from_numpy(n_slots).to(device),
    )


def _element_index(numbers: np.ndarray, element_lookup: np.ndarray) -> np.ndarray:
    numbers = numbers.astype(np.int64)
    known = (numbers >= 0) & (numbers < len(element_lookup))
    index = np.full(len(numbers), -1, dtype=np.int64)
    index[known] = element_lookup[numbers[known]]
    if np.any(index < 0):
        from ase.data import chemical_symbols

        from xtalforge.errors import XtalforgeError

        unknown = sorted({int(z) for z in numbers[index < 0]})
        names = ", ".join(chemical_symbols[z] if 0 < z < len(chemical_symbols) else str(z) for z in unknown)
        raise XtalforgeError(f"the potential was not trained on element(s) {names}: train it on data containing them")
    return index


def _pad(centre, neighbour, vectors, kept, element, n_atoms: int, n_elements: int):
    """(N, W) slots grouped by neighbour element, filled with the pairs ``kept``.

    The slot of a pair is its element group's offset plus its rank among the centre's
    neighbours of that element (in search order).  ``vectors`` has one row more than there
    are pairs: what empty slots get.  Returns vectors, neighbours, (N, E) counts and the offsets.
    """
    i, j = np.take(centre, kept), np.take(neighbour, kept)
    if len(i) > 1 and np.any(i[1:] < i[:-1]):
        order = np.argsort(i, kind="stable")
        kept, i, j = kept[order], i[order], j[order]
    neighbour_element = None if n_elements == 1 else np.take(element, j)
    key = i if n_elements == 1 else i * n_elements + neighbour_element
    counts = np.bincount(key, minlength=n_atoms * n_elements)
    n_slots = counts.reshape(n_atoms, n_elements)
    if n_elements == 1:
        rank = np.arange(len(i)) - np.take(np.cumsum(counts) - counts, i)
    else:
        # Pairs are sorted by centre, so those of one neighbour element are too: a pair's rank
        # is its position among them minus how many belong to earlier centres.
        rank = np.empty(len(i), dtype=np.int64)
        for e in range(n_elements):
            of_e = np.flatnonzero(neighbour_element == e)
            before = np.cumsum(n_slots[:, e]) - n_slots[:, e]
            rank[of_e] = np.arange(len(of_e)) - np.take(before, np.take(i, of_e))
    widths = n_slots.max(axis=0) if n_atoms else np.zeros(n_elements, dtype=np.int64)
    widths = np.maximum(widths, 1)  # an empty group still gets one (padding) slot: shapes stay simple
    segments = _segment_offsets(widths)
    width = segments[-1]
    slot = i * width + rank
    if n_elements > 1:
        slot += np.take(np.asarray(segments[:-1]), neighbour_element)
    pair_of_slot = np.full(n_atoms * width, len(vectors) - 1, dtype=np.int64)
    pair_of_slot[slot] = kept
    vec_pad = np.take(vectors, pair_of_slot, axis=0)
    neighbour_pad = np.repeat(np.arange(n_atoms, dtype=np.int64), width)
    neighbour_pad[slot] = j
    return vec_pad.reshape(n_atoms, width, 3), neighbour_pad.reshape(n_atoms, width), n_slots, segments


# --------------------------------------------------------------------------- monomials


def _monomial_exponents(max_degree: int) -> list[tuple[int, int, int]]:
    """Exponents in the order :meth:`SymmetryFunctions.monomials` builds them.

    Degree n: x·(all of degree n-1), then y·(those of degree n-1 without x), then z^n.
    """
    by_degree = [[(0, 0, 0)]]
    for n in range(1, max_degree + 1):
        prev = by_degree[-1]
        level = [(a + 1, b, c) for a, b, c in prev] + [(a, b + 1, c) for a, b, c in prev[-n:]] + [(0, 0, n)]
        by_degree.append(level)
    return [e for level in by_degree for e in level]


def _monomial_tables(max_degree: int):
    exponents = _monomial_exponents(max_degree)
    index = {e: k for k, e in enumerate(exponents)}
    degree = [sum(e) for e in exponents]
    scale = [
        math.sqrt(math.factorial(sum(e)) / (math.factorial(e[0]) * math.factorial(e[1]) * math.factorial(e[2])))
        for e in exponents
    ]
    # derivative[c][α, β] = ∂Ỹ_α/∂u_c expressed in Ỹ_β: α_c sqrt(mult α / mult β) for β = α - e_c.
    derivative = torch.zeros(3, len(exponents), len(exponents), dtype=torch.float64)
    for c in range(3):
        for k, e in enumerate(exponents):
            if e[c] > 0:
                b = index[tuple(e[d] - (d == c) for d in range(3))]
                derivative[c, k, b] = e[c] * scale[k] / scale[b]
    return exponents, degree, scale, derivative


# --------------------------------------------------------------------------- the descriptor


@dataclass
class PairBasis:
    """Per-slot radial weights, their r-derivatives and the angular monomials.

    Channels come before the slot axis W (innermost), so every elementwise operation runs
    over contiguous memory and the moments are plain batched matrix products.
    """

    r: torch.Tensor  # (N, W)
    u: torch.Tensor  # (N, 3, W) unit vectors
    w: torch.Tensor  # (N, n_rad + n_eta, W): radial G2 weights, then angular weights
    dw: torch.Tensor  # d/dr of w
    monomials: torch.Tensor  # (N, n_mono, W) unscaled u_x^a u_y^b u_z^c, by degree
    segments: tuple[int, ...]  # slot offsets of the neighbour elements
    n_radial: int
    n_low: int  # monomials of degree < max ζ (the first n_low): all the gradient needs

    @property
    def low(self) -> torch.Tensor:
        """(N, n_low, W) the monomials of degree < max ζ (a view)."""
        return self.monomials[:, :self.n_low]

    @property
    def w_ang(self) -> torch.Tensor:
        return self.w[:, self.n_radial:]

    @property
    def dw_ang(self) -> torch.Tensor:
        return self.dw[:, self.n_radial:]


@dataclass
class Moments:
    """Per-atom sums over neighbours of one element; the descriptor is a quadratic form of these."""

    radial: torch.Tensor  # (..., N, E, n_rad + n_eta): Σ_j G2 weights, then Σ_j (angular weight)²
    angular: torch.Tensor  # (..., N, E, n_eta, n_mono), scaled monomials

    def expand(self, n: int, requires_grad: bool = False) -> Moments:
        """n independent copies (one per ensemble member) as autograd leaves."""
        def rep(t):
            return t.detach().expand(n, *t.shape).clone().requires_grad_(requires_grad)

        return Moments(rep(self.radial), rep(self.angular))


def _segment_products(left: torch.Tensor, right: torch.Tensor, segments) -> torch.Tensor:
    """left (n, E, a, b) @ right[..., segment e] (n, b, W_e) for every neighbour element e,
    concatenated along the slot axis: (n, a, W)."""
    if len(segments) == 2:
        return left[:, 0] @ right
    return torch.cat([left[:, e] @ right[..., lo:hi] for e, (lo, hi) in enumerate(pairwise(segments))], dim=-1)


class SymmetryFunctions(nn.Module):
    """Radial G2 and angular G5 (moment expansion) or G4 (explicit triplets) symmetry functions."""

    def __init__(
        self,
        cutoff: float = 6.0,
        radial_eta=DEFAULT_RADIAL_ETA,
        radial_shift=None,
        angular_eta=DEFAULT_ANGULAR_ETA,
        zeta=DEFAULT_ZETA,
        lambdas=DEFAULT_LAMBDA,
        angular: str = "g5",
    ):
        super().__init__()
        if angular not in ("g4", "g5"):
            raise ValueError(f"angular must be 'g4' or 'g5', got {angular!r}")
        zeta = [int(z) for z in zeta]
        if not zeta or not lambdas or any(z < 1 for z in zeta) or any(l not in (-1, 1) for l in lambdas):
            raise ValueError("zeta must be positive integers and lambda ±1")
        if not radial_eta or not angular_eta or cutoff <= 0:
            raise ValueError("symmetry functions need a positive cutoff and at least one radial and angular eta")
        radial_shift = [0.0] * len(radial_eta) if radial_shift is None else list(radial_shift)
        if len(radial_shift) != len(radial_eta):
            raise ValueError("radial_shift needs one value per radial eta")
        self.cutoff = float(cutoff)
        self.angular = angular
        self.shifted = any(s != 0.0 for s in radial_shift)  # radial Gaussians not all centred at r = 0
        self._pair_cache: dict = {}
        self.zeta_values = zeta
        self.lambda_values = [int(l) for l in lambdas]
        self.register_buffer("radial_eta", torch.tensor(radial_eta, dtype=torch.float64))
        self.register_buffer("radial_shift", torch.tensor(radial_shift, dtype=torch.float64))
        self.register_buffer("angular_eta", torch.tensor(angular_eta, dtype=torch.float64))
        self.register_buffer("all_eta", torch.cat([self.radial_eta, self.angular_eta]), persistent=False)
        self.register_buffer("all_shift", torch.cat([self.radial_shift, torch.zeros_like(self.angular_eta)]), persistent=False)
        self.max_degree = max(zeta)
        exps, degree, scale, derivative = _monomial_tables(self.max_degree)
        self.register_buffer("mono_degree", torch.tensor(degree, dtype=torch.float64))
        self.register_buffer("mono_scale", torch.tensor(scale, dtype=torch.float64))
        # Kept in model files (format 1); the gradient below uses the narrower operator after it.
        ops = [torch.eye(len(exps), dtype=torch.float64), torch.diag(torch.tensor(degree, dtype=torch.float64)), *derivative]
        self.register_buffer("gradient_operator", torch.cat(ops, dim=1))
        # ∂(u_x^a u_y^b u_z^c)/∂u_c in the unscaled monomials of degree < max ζ (the first n_low),
        # one block of columns per component c: [∂x | ∂y | ∂z].
        self.n_low_monomials = sum((n + 1) * (n + 2) // 2 for n in range(self.max_degree))
        unscaled = torch.zeros(len(exps), 3 * self.n_low_monomials, dtype=torch.float64)
        index = {e: k for k, e in enumerate(exps)}
        for k, e in enumerate(exps):
            for c in range(3):
                if e[c] > 0:
                    unscaled[k, c * self.n_low_monomials + index[tuple(e[d] - (d == c) for d in range(3))]] = e[c]
        self.register_buffer("monomial_gradient", unscaled, persistent=False)
        deg_sum = torch.zeros(len(exps), self.max_degree + 1, dtype=torch.float64)
        deg_sum[torch.arange(len(exps)), torch.tensor(degree)] = 1.0  # Σ over monomials of one degree
        self.register_buffer("degree_sum", deg_sum)
        lz = torch.zeros(self.max_degree + 1, len(zeta) * len(lambdas), dtype=torch.float64)
        for col, (z, l) in enumerate((z, l) for z in zeta for l in lambdas):
            for n in range(z + 1):
                lz[n, col] = 2.0 ** (1 - z) * math.comb(z, n) * float(l) ** n  # (1+λc)^ζ = Σ_n C(ζ,n) λ^n c^n
        self.register_buffer("lambda_zeta", lz)
        # Monomial products straight to (λ, ζ) columns, and what the j = k terms add to each column.
        self.register_buffer("monomial_lambda_zeta", deg_sum @ lz, persistent=False)
        self.register_buffer("lambda_zeta_total", lz.sum(0), persistent=False)

    # -- sizes and parameters

    @property
    def n_radial(self) -> int:
        return int(self.radial_eta.numel())

    @property
    def n_angular_eta(self) -> int:
        return int(self.angular_eta.numel())

    @property
    def n_lambda_zeta(self) -> int:
        return len(self.zeta_values) * len(self.lambda_values)

    @property
    def n_monomials(self) -> int:
        return int(self.mono_degree.numel())

    def n_features(self, n_elements: int) -> int:
        """8·E + 18·E(E+1)/2 with the defaults: 26, 70, 132, 212 for 1–4 elements."""
        n_pairs = n_elements * (n_elements + 1) // 2
        return self.n_radial * n_elements + n_pairs * self.n_angular_eta * self.n_lambda_zeta

    def params(self) -> dict:
        """Plain settings, enough to rebuild this descriptor (stored in model files)."""
        return {
            "cutoff": self.cutoff,
            "radial_eta": self.radial_eta.tolist(),
            "radial_shift": self.radial_shift.tolist(),
            "angular_eta": self.angular_eta.tolist(),
            "zeta": list(self.zeta_values),
            "lambdas": list(self.lambda_values),
            "angular": self.angular,
        }

    @classmethod
    def from_params(cls, params: dict) -> SymmetryFunctions:
        return cls(**params)

    @classmethod
    def from_config(cls, config) -> SymmetryFunctions:
        return cls(
            cutoff=config.cutoff, radial_eta=config.radial_eta, radial_shift=config.radial_shift,
            angular_eta=config.angular_eta, zeta=config.angular_zeta, lambdas=config.angular_lambda,
            angular=config.angular,
        )

    # -- per-slot quantities

    def _cutoff_fn(self, r: torch.Tensor):
        """fc = (cos(π r/rc) + 1)/2 and its derivative, both exactly 0 at and beyond rc."""
        x = torch.clamp(r, max=self.cutoff).mul_(math.pi / self.cutoff)
        fc = torch.cos(x).add_(1.0).mul_(0.5)  # cos(π) = -1 exactly: fc = 0 at r >= rc
        dfc = torch.sin(x).mul_(-0.5 * math.pi / self.cutoff)  # sin(π) is not exactly 0 in floating point:
        return fc, dfc.masked_fill_(r >= self.cutoff, 0.0)  # set fc' = 0 beyond rc by hand

    def pair_basis(self, vec: torch.Tensor, segments=None) -> PairBasis:
        """Radial weights, their derivatives and monomials of every neighbour slot of (N, W, 3)."""
        dtype = vec.dtype
        components = vec.permute(2, 0, 1).contiguous()  # (3, N, W)
        x, y, z = components
        r = torch.sqrt(x * x + y * y + z * z)  # (faster than vector_norm over a leading dim)
        u = components * (1.0 / r)
        fc, dfc = self._cutoff_fn(r)
        # All exponentials at once: radial etas with their shifts, then angular etas (shift 0).
        # w = exp(-η (r - Rs)²) fc and w' = exp(-η (r - Rs)²) (fc' - 2η (r - Rs) fc), each
        # (N, K, W) array written once and then updated in place (these passes are the cost).
        eta = self.all_eta.to(dtype)[:, None]
        r_, fc_, dfc_ = r[:, None, :], fc[:, None, :], dfc[:, None, :]
        if self.shifted:
            dr = r_ - self.all_shift.to(dtype)[:, None]
            gauss = (dr * dr).mul_(-eta).exp_()
            dw = torch.addcmul(dfc_, dr * fc_, eta, value=-2.0)
        else:
            gauss = torch.mul((r * r)[:, None, :], -eta).exp_()
            dw = torch.addcmul(dfc_, (r * fc)[:, None, :], eta, value=-2.0)
        w = gauss * fc_
        dw.mul_(gauss)
        segments = (0, vec.shape[1]) if segments is None else tuple(segments)
        return PairBasis(r, u.transpose(0, 1), w, dw, self._monomial_block(u), segments, self.n_radial,
                         self.n_low_monomials)

    def _monomial_block(self, u: torch.Tensor) -> torch.Tensor:
        """Monomials (N, n_mono, W), written level by level into one preallocated block (three
        products per degree, no copies)."""
        if u.requires_grad:
            return self.monomials(u)
        x, y, z = u[0].unsqueeze(-2), u[1].unsqueeze(-2), u[2].unsqueeze(-2)  # (N, 1, W)
        block = u.new_empty(u.shape[1], self.n_monomials, u.shape[2])
        block[:, 0] = 1.0
        start, prev = 1, block[:, 0:1]
        for n in range(1, self.max_degree + 1):
            size = (n + 1) * (n + 2) // 2
            level = block[:, start: start + size]
            k = prev.shape[1]  # x·(previous level), y·(its last n), z^n
            torch.mul(x, prev, out=level[:, :k])
            torch.mul(y, prev[:, -n:], out=level[:, k: k + n])
            torch.mul(z, prev[:, -1:], out=level[:, k + n:])
            prev, start = level, start + size
        return block

    def monomials(self, u: torch.Tensor) -> torch.Tensor:
        """u_x^a u_y^b u_z^c for all |α| <= max ζ, from u (3, ...) -> (..., n_mono, W).

        Built from whole contiguous arrays (one multiplication per monomial): far faster than
        gathering powers.  The sqrt-multinomial scale is applied on the per-atom side.
        """
        x, y, z = u[0].unsqueeze(-2), u[1].unsqueeze(-2), u[2].unsqueeze(-2)  # (..., 1, W)
        level = torch.ones_like(x)
        out = [level]
        z_power = level
        for n in range(1, self.max_degree + 1):  # one level of degree n from the previous: 3 products
            z_power = z_power * z
            level = torch.cat([x * level, y * level[..., -n:, :], z_power], dim=-2)
            out.append(level)
        return torch.cat(out, dim=-2)

    def moments(self, basis: PairBasis) -> Moments:
        """Per-atom, per-neighbour-element sums of the radial weights and weight × monomial."""
        nr, segments = basis.n_radial, basis.segments
        w_ang = basis.w_ang
        dtype = w_ang.dtype
        mono_t = basis.monomials.transpose(-1, -2)  # (N, W, nm)
        if len(segments) == 2:
            radial = torch.cat([basis.w[:, :nr].sum(-1), (w_ang * w_ang).sum(-1)], dim=-1)[:, None]
            angular = (w_ang @ mono_t)[:, None]
        else:
            indicator = _segment_indicator(segments, basis.r.device, dtype)  # (W, E)
            radial = torch.cat([basis.w[:, :nr] @ indicator, (w_ang * w_ang) @ indicator], dim=1).transpose(1, 2)
            angular = torch.stack([w_ang[..., lo:hi] @ mono_t[:, lo:hi] for lo, hi in pairwise(segments)], dim=1)
        return Moments(radial, angular * self.mono_scale.to(dtype))

    # -- features

    def _pairs(self, n_elements: int, device, dtype):
        """Element pair bookkeeping (cached): for each unordered pair p = (a, b), a <= b, in
        the order of the angular blocks, its first and second element and its count of
        ordered pairs (2 if a != b, else 1) as a (P, 1, 1) tensor; the pair of each ordered
        (a, b) as an (E, E) index; the pairs (a, a)."""
        key = (n_elements, str(device), dtype)
        cached = self._pair_cache.get(key)
        if cached is None:
            pairs = list(combinations_with_replacement(range(n_elements), 2))
            first = torch.tensor([a for a, _ in pairs], device=device)
            second = torch.tensor([b for _, b in pairs], device=device)
            multiplicity = torch.tensor([1.0 if a == b else 2.0 for a, b in pairs], dtype=dtype, device=device)
            index = torch.zeros(n_elements, n_elements, dtype=torch.long, device=device)
            for p, (a, b) in enumerate(pairs):
                index[a, b] = index[b, a] = p
            cached = (first, second, multiplicity[:, None, None], index, index.diagonal().clone())
            self._pair_cache[key] = cached
        return cached

    def features_from_moments(self, moments: Moments) -> torch.Tensor:
        """G (..., N, F); differentiable (quadratic in the moments).

        Angular block of element pair {a, b}: Σ_{j∈a, k∈b} over ordered pairs, i.e.
        Σ_n λζ-weights · Σ_{|α|=n} (A_a,α A_b,α + A_b,α A_a,α) minus the j = k terms.
        """
        nr = self.n_radial
        radial = moments.radial[..., :nr].flatten(-2)
        self_terms = moments.radial[..., nr:]  # Σ_j w_j²: the j = k terms to remove, (..., E, ne)
        ang = moments.angular  # (..., E, ne, nm)
        dtype = ang.dtype
        n_el = ang.shape[-3]
        to_columns = self.monomial_lambda_zeta.to(dtype)  # (nm, λζ)
        total = self.lambda_zeta_total.to(dtype)
        if n_el == 1:  # one element pair: no pair bookkeeping
            angular = (ang * ang) @ to_columns - self_terms[..., None] * total
            return torch.cat([radial, angular.flatten(-3)], dim=-1)
        first, second, multiplicity, _, same = self._pairs(n_el, ang.device, dtype)
        products = ang.index_select(-3, first) * ang.index_select(-3, second)  # (..., P, ne, nm)
        angular = (products @ to_columns) * multiplicity  # (..., P, ne, λζ): (a, b) and (b, a) alike
        # j = k terms exist only in same-element pairs: remove them there (P rows of a = b).
        angular = angular.index_add(-3, same, self_terms[..., None] * -total)
        return torch.cat([radial, angular.flatten(-3)], dim=-1)

    def moment_gradients(self, moments: Moments, grad: torch.Tensor) -> Moments:
        """dE/d(moments) (M, N, E, ...) from dE/dG (M, N, F): the backward pass of
        :meth:`features_from_moments` by hand.

        G_ang(a, b) = Σ_α C_α (A_a,α A_b,α + A_b,α A_a,α) (one product when a = b) minus the
        j = k terms, so dE/dA_c = 2 Σ_b A_b (g_{c,b} C^T) and dE/d(Σ w²)_a = -g_{a,a}·total.
        """
        nr = self.n_radial
        ang = moments.angular  # (N, E, ne, nm)
        n_atoms, n_el, n_eta, n_mono = ang.shape
        n_members = grad.shape[0]
        dtype = ang.dtype
        to_columns = self.monomial_lambda_zeta.to(dtype)  # (nm, λζ)
        total = self.lambda_zeta_total.to(dtype)
        n_lz = to_columns.shape[1]
        g_radial = grad[..., :n_el * nr].reshape(n_members, n_atoms, n_el, nr)
        g_angular = grad[..., n_el * nr:].reshape(-1, n_lz)  # one plain matrix product below
        per_monomial = (g_angular @ (2.0 * to_columns.T)).view(n_members, n_atoms, -1, n_eta, n_mono)  # (M, N, P, ne, nm)
        g_angular = g_angular.view(n_members, n_atoms, -1, n_eta, n_lz)
        if n_el == 1:
            d_angular = per_monomial * ang
            same = g_angular
        else:
            _, _, _, pair, same_pairs = self._pairs(n_el, ang.device, dtype)
            per_monomial = per_monomial[:, :, pair.flatten()].view(n_members, n_atoms, n_el, n_el, n_eta, n_mono)
            d_angular = (per_monomial * ang[:, None]).sum(3)
            same = g_angular[:, :, same_pairs]
        d_self = same @ -total  # (M, N, E, ne)
        return Moments(torch.cat([g_radial, d_self], dim=-1), d_angular)

    def features(self, graph: NeighbourGraph) -> torch.Tensor:
        """G (N, F) of every atom (differentiable with respect to ``graph.vec``)."""
        if self.angular == "g4":
            return self.triplet_features(graph, include_jk=True)
        return self.features_from_moments(self.moments(self.pair_basis(graph.vec, graph.segments)))

    def slot_gradients(self, grad: Moments, basis: PairBasis) -> torch.Tensor:
        """dE/dvec (N, M, 3, W) from dE/d(moments) (M, N, E, ...), analytically.

        With P_η(u) = Σ_α g_ηα Ỹ_α(u) the per-atom polynomial an angular slot feels,
        d/dvec [w_η(r) P_η(u)] = w_η' P_η u + w_η (∇P_η - u (u·∇P_η)) / r; ∇P_η has degree
        < max ζ, so it is evaluated on the lower monomials only, and u·∇P_η is the Euler
        identity for the degree-weighted polynomial.  One batched product per neighbour
        element evaluates the polynomials of all M ensemble members at once.
        """
        g_rad, g_ang = grad.radial, grad.angular  # (M, N, E, K), (M, N, E, ne, nm)
        n_members, n_atoms, n_el, n_eta, n_mono = g_ang.shape
        dtype = g_ang.dtype
        low = self.n_low_monomials
        scaled = g_ang * self.mono_scale.to(dtype)  # (M, N, E, ne, nm), contiguous: one plain mm below
        gradient_coeff = (scaled @ self.monomial_gradient.to(dtype)).permute(1, 2, 0, 3, 4)  # (N, E, M, ne, 3·low)
        coeff = scaled.permute(1, 2, 0, 3, 4)  # (N, E, M, ne, nm)
        value = _segment_products(coeff.reshape(n_atoms, n_el, -1, n_mono), basis.monomials, basis.segments)
        slope = _segment_products(gradient_coeff.reshape(n_atoms, n_el, -1, low), basis.low, basis.segments)
        width = basis.r.shape[-1]
        value = value.view(n_atoms, n_members, n_eta, width)
        slope = slope.view(n_atoms, n_members, n_eta, 3, width)
        w_ang, dw_ang = basis.w_ang, basis.dw_ang
        along_r = (value * dw_ang[:, None]).sum(2)  # (N, M, W)
        tangential = (slope * w_ang[:, None, :, None]).sum(2)  # (N, M, 3, W): Σ_η w_η ∇P_η
        # Radial moments: G2 weights, and the squared angular weights of the j = k terms.
        nr = basis.n_radial
        d_radial = torch.cat([basis.dw[:, :nr], 2.0 * w_ang * dw_ang], dim=1)  # (N, K, W)
        along_r = along_r + _segment_products(g_rad.permute(1, 2, 0, 3), d_radial, basis.segments)
        u = basis.u[:, None]  # (N, 1, 3, W)
        inv_r = (1.0 / basis.r)[:, None]  # (N, 1, W)
        along_r = along_r - (u * tangential).sum(2) * inv_r
        return u * along_r[:, :, None] + tangential * inv_r[:, :, None]  # (N, M, 3, W)

    # -- explicit triplets (G4, and a reference for the moment expansion)

    def triplet_features(self, graph: NeighbourGraph, include_jk: bool = True) -> torch.Tensor:
        """G (N, F) with the angular part summed over explicit triplets (pairs of neighbour slots).

        ``include_jk=True`` is Behler's G4; ``False`` gives G5, equal to the moment expansion.
        """
        n_atoms, width, _ = graph.vec.shape
        n_el = graph.n_elements
        dtype = graph.vec.dtype
        vec = graph.vec
        r = torch.linalg.vector_norm(vec, dim=-1)  # (N, W)
        fc, _ = self._cutoff_fn(r)
        eta, rs = self.radial_eta.to(dtype), self.radial_shift.to(dtype)
        per_slot = torch.exp(-eta * (r[..., None] - rs) ** 2) * fc[..., None]  # (N, W, n_rad)
        indicator = _segment_indicator(graph.segments, r.device, dtype)  # (W, E)
        radial = (per_slot.transpose(1, 2) @ indicator).transpose(1, 2)  # (N, E, n_rad)
        valid = r < self.cutoff
        pair_mask = valid[:, :, None] & valid[:, None, :]
        pair_mask &= ~torch.eye(width, dtype=torch.bool, device=r.device)
        atom, p, q = torch.nonzero(pair_mask, as_tuple=True)
        v_p, v_q = vec[atom, p], vec[atom, q]
        r_p, r_q = r[atom, p], r[atom, q]
        cos = (v_p * v_q).sum(-1) / (r_p * r_q)
        r2 = r_p**2 + r_q**2
        radial_factor = fc[atom, p] * fc[atom, q]
        if include_jk:
            r_jk = torch.linalg.vector_norm(v_q - v_p, dim=-1)
            r2 = r2 + r_jk**2
            radial_factor = radial_factor * self._cutoff_fn(r_jk)[0]
        gauss = torch.exp(-self.angular_eta.to(dtype) * r2[:, None]) * radial_factor[:, None]  # (T, ne)
        zl = torch.tensor([(z, l) for z in self.zeta_values for l in self.lambda_values], dtype=dtype, device=r.device)
        angular_part = 2.0 ** (1 - zl[:, 0]) * (1.0 + zl[:, 1] * cos[:, None]) ** zl[:, 0]  # (T, nlz)
        values = (gauss[:, :, None] * angular_part[:, None, :]).flatten(1)
        slot_element = graph.slot_element()
        e_p, e_q = slot_element[p], slot_element[q]
        lo, hi = torch.minimum(e_p, e_q), torch.maximum(e_p, e_q)
        pair_index = lo * n_el - lo * (lo - 1) // 2 + (hi - lo)  # order of combinations_with_replacement
        n_pairs = n_el * (n_el + 1) // 2
        angular = values.new_zeros(n_atoms * n_pairs, values.shape[1])
        angular.index_add_(0, atom * n_pairs + pair_index, values)
        return torch.cat([radial.reshape(n_atoms, -1), angular.view(n_atoms, -1)], dim=1)


_INDICATORS: dict = {}


def _segment_indicator(segments, device, dtype) -> torch.Tensor:
    """(W, E) one-hot of the neighbour element of each slot (cached: a handful of shapes)."""
    key = (tuple(segments), str(device), dtype)
    cached = _INDICATORS.get(key)
    if cached is None:
        if len(_INDICATORS) > 256:
            _INDICATORS.clear()
        cached = torch.zeros(segments[-1], len(segments) - 1, dtype=dtype, device=device)
        for e, (lo, hi) in enumerate(pairwise(segments)):
            cached[lo:hi, e] = 1.0
        _INDICATORS[key] = cached
    return cached
