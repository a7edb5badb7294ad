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

Neighbours are stored as a dense, padded matrix per atom and neighbour element
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


@dataclass
class NeighbourGraph:
    """Full neighbour lists of a flat batch, as a padded matrix (atom, neighbour element, slot).

    ``vec[i, e, s]`` is r_j - r_i (+ lattice shift) for the s-th neighbour j of element e of
    atom i; unused slots hold a vector of length 2·cutoff (zero weight) and ``neighbour`` = i.
    Every pair appears twice (i→j and j→i), which is what per-atom sums need.
    """

    vec: torch.Tensor  # (N, E, W, 3) model dtype
    neighbour: torch.Tensor  # (N, E, W) int64
    element: torch.Tensor  # (N,) int64 index into the model's elements
    system_idx: torch.Tensor  # (N,) int64
    volume: torch.Tensor  # (S,) Å³, NaN where a structure is not periodic in all directions
    n_systems: int
    cutoff: float
    n_slots: torch.Tensor | None = None  # (N,) slots in use per atom (most neighbours of one element)

    @property
    def n_atoms(self) -> int:
        return int(self.vec.shape[0])

    @property
    def n_elements(self) -> int:
        return int(self.vec.shape[1])

    @property
    def width(self) -> int:
        return int(self.vec.shape[2])

    def valid(self) -> torch.Tensor:
        """(N, E, W) bool: slots holding a real neighbour."""
        return torch.linalg.vector_norm(self.vec, dim=-1) < self.cutoff

    def atoms_by_element(self, n_elements: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Atom indices grouped by element, and the permutation back to atom order."""
        if n_elements == 1:
            return [slice(None)], None
        groups = [torch.nonzero(self.element == e).flatten() for e in range(n_elements)]
        order = torch.cat(groups)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return groups, inverse

    def atom_slice(self, start: int, stop: int) -> NeighbourGraph:
        """The rows of atoms start..stop-1 (neighbour indices stay global), trimmed to the
        slots these atoms use: one crowded structure does not widen every chunk of a batch."""
        width = self.width
        n_slots = None
        if self.n_slots is not None:
            n_slots = self.n_slots[start:stop]
            width = max(1, int(n_slots.max())) if stop > start else 1
        return NeighbourGraph(
            self.vec[start:stop, :, :width], self.neighbour[start:stop, :, :width], self.element[start:stop],
            self.system_idx[start:stop], self.volume, self.n_systems, self.cutoff, n_slots,
        )

    def with_vec(self, vec: torch.Tensor) -> NeighbourGraph:
        return NeighbourGraph(vec, self.neighbour, self.element, self.system_idx, self.volume, self.n_systems,
                              self.cutoff, self.n_slots)

    def to(self, device=None, dtype=None) -> NeighbourGraph:
        return NeighbourGraph(
            self.vec.to(device=device, dtype=dtype), self.neighbour.to(device), self.element.to(device),
            self.system_idx.to(device), self.volume.to(device=device, dtype=dtype), self.n_systems, self.cutoff,
            None if self.n_slots is None else self.n_slots.to(device),
        )

    def padded(self, width: int) -> NeighbourGraph:
        """The same graph with ``width`` slots per (atom, element)."""
        if width == self.width:
            return self
        n, e, w = self.neighbour.shape
        vec = self.vec.new_zeros(n, e, width, 3)
        vec[..., 0] = 2.0 * self.cutoff
        vec[:, :, :w] = self.vec
        neighbour = torch.arange(n, device=self.neighbour.device)[:, None, None].expand(n, e, width).clone()
        neighbour[:, :, :w] = self.neighbour
        return NeighbourGraph(vec, neighbour, self.element, self.system_idx, self.volume, self.n_systems, self.cutoff,
                              self.n_slots)

    @staticmethod
    def concat(graphs: list[NeighbourGraph]) -> NeighbourGraph:
        """One graph of several (indices offset, widths padded to the largest)."""
        width = max(g.width for g in graphs)
        graphs = [g.padded(width) for g in graphs]
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
            n_slots=None if any(g.n_slots is None for g in graphs) else torch.cat([g.n_slots for g in graphs]),
        )


def _find_neighbours(positions: np.ndarray, cell: np.ndarray, pbc, cutoff: float):
    """Raw (centre, neighbour, lattice images, distances) of one structure.

    pymatgen's cell-list search (C, ships with pymatgen) is several times faster than
    vesin's or matscipy's for the small periodic cells of structure search, where most of the
    ~45 neighbours within 6 Å are periodic images.
    """
    from pymatgen.optimization.neighbors import find_points_in_spheres

    pbc = np.asarray(pbc, dtype=bool)
    if not pbc.all() and abs(np.linalg.det(cell)) < 1e-8:
        cell = np.eye(3)  # open boundaries: the lattice only sets the search grid, shifts stay 0
    return find_points_in_spheres(positions, positions, float(cutoff), pbc.astype(np.int64), cell, tol=1e-8)


def neighbour_pairs(positions: np.ndarray, cell: np.ndarray, pbc, cutoff: float):
    """Full neighbour list (i, j, r_j - r_i + lattice shift) of one structure, sorted by i."""
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    cell = np.ascontiguousarray(cell, dtype=np.float64)
    found = _find_neighbours(positions, cell, pbc, cutoff)
    i, j, vectors, _ = _clean_pairs(*found, positions, cell[None], np.zeros(len(found[0]), dtype=np.int64), cutoff)
    return i, j, vectors


def _clean_pairs(centre, neighbour, images, distances, positions, cells, pair_system, cutoff):
    """Drop self pairs and pairs at exactly the cutoff, sort by centre, compute pair vectors."""
    keep = (distances > 1e-8) & (distances < cutoff)
    # np.take/np.compress: several times faster than fancy indexing on these sizes
    centre, neighbour = np.compress(keep, centre), np.compress(keep, neighbour)
    images, pair_system = np.compress(keep, images, axis=0), np.compress(keep, pair_system)
    if len(centre) > 1 and np.any(centre[1:] < centre[:-1]):
        order = np.argsort(centre, kind="stable")
        centre, neighbour, images, pair_system = centre[order], neighbour[order], images[order], pair_system[order]
    vectors = np.take(positions, neighbour, axis=0) - np.take(positions, centre, axis=0)
    bounds = np.searchsorted(pair_system, np.arange(len(cells) + 1))
    for s, (a, b) in enumerate(pairwise(bounds)):
        if b > a:
            vectors[a:b] += images[a:b] @ cells[s]
    return centre.astype(np.int64), neighbour.astype(np.int64), vectors, pair_system


def build_graph(batch, cutoff: float, element_lookup: torch.Tensor, n_elements: int, dtype=torch.float64) -> NeighbourGraph:
    """Neighbour graph of a :class:`~xtalforge.structures.batch.Batch` (one neighbour search per structure).

    Index work is done in numpy: for one structure it is several times cheaper than torch's
    per-operation overhead.
    """
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
    found = [_find_neighbours(positions[a:b], cells[s], pbc[s], cutoff) for s, (a, b) in enumerate(pairwise(starts))]
    if n_systems == 1:
        centre, neighbour, images, distances = found[0]
        pair_system = np.zeros(len(centre), dtype=np.int64)
    elif found:
        sizes = [len(f[0]) for f in found]
        offsets = np.repeat(starts[:-1], sizes)
        pair_system = np.repeat(np.arange(n_systems), sizes)
        centre = np.concatenate([f[0] for f in found]) + offsets
        neighbour = np.concatenate([f[1] for f in found]) + offsets
        images = np.concatenate([f[2] for f in found])
        distances = np.concatenate([f[3] for f in found])
    else:
        centre = neighbour = pair_system = np.zeros(0, dtype=np.int64)
        images, distances = np.zeros((0, 3)), np.zeros(0)
    # Pair vectors in float64 (differences of large coordinates lose digits in float32).
    i, j, vectors, _ = _clean_pairs(centre, neighbour, images, distances, positions, cells, pair_system, cutoff)
    vec_pad, neighbour_pad, n_slots = _pad(i, j, vectors, element, n_atoms, n_elements, cutoff)
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


def _pad(i, j, vectors, element, n_atoms: int, n_elements: int, cutoff: float):
    """Scatter pairs (sorted by i) into (N, E, W) slots; the slot is the rank within (i, element of j)."""
    counts = np.bincount(i, minlength=n_atoms)
    block_start = (np.cumsum(counts) - counts)[i]  # first pair of each pair's centre
    if n_elements == 1:
        key = i
        rank = np.arange(len(i)) - block_start
    else:
        e_j = element[j]
        key = i * n_elements + e_j
        rank = np.empty_like(i)
        for e in range(n_elements):  # rank among the centre's neighbours of element e
            mask = e_j == e
            running = np.cumsum(mask)
            before = np.where(block_start > 0, running[np.maximum(block_start - 1, 0)], 0)
            rank[mask] = (running - 1 - before)[mask]
    width = int(rank.max()) + 1 if len(rank) else 1
    n_slots = np.bincount(key, minlength=n_atoms * n_elements).reshape(n_atoms, n_elements).max(axis=1)
    flat = key * width + rank
    vec_pad = np.zeros((n_atoms * n_elements * width, 3))
    vec_pad[:, 0] = 2.0 * cutoff
    vec_pad[flat] = vectors
    neighbour = np.repeat(np.arange(n_atoms, dtype=np.int64), n_elements * width)
    neighbour[flat] = j
    return vec_pad.reshape(n_atoms, n_elements, width, 3), neighbour.reshape(n_atoms, n_elements, width), n_slots


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

    r: torch.Tensor  # (N, E, W)
    u: torch.Tensor  # (N, E, 3, W) unit vectors
    w_rad: torch.Tensor  # (N, E, n_rad + n_eta, W): radial G2 weights, then angular weights squared
    dw_rad: torch.Tensor  # d/dr of w_rad
    w_ang: torch.Tensor  # (N, E, n_eta, W)
    dw_ang: torch.Tensor
    monomials: torch.Tensor  # (N, E, n_mono, W) unscaled u_x^a u_y^b u_z^c


@dataclass
class Moments:
    """Per-atom sums over neighbours of one element; the descriptor is a quadratic form of these."""

    radial: torch.Tensor  # (..., N, E, n_rad + n_eta)
    angular: torch.Tensor  # (..., N, E, n_eta, n_mono), scaled monomials

    def expand(self, n: int, requires_grad: bool = False) -> Moments:
        """n independent copies (one per ensemble member) as autograd leaves."""
        def rep(t):
            return t.detach().expand(n, *t.shape).clone().requires_grad_(requires_grad)

        return Moments(rep(self.radial), rep(self.angular))


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
        # Gradient operator on the per-atom side: [identity | degree | ∂/∂u_x | ∂/∂u_y | ∂/∂u_z].
        ops = [torch.eye(len(exps), dtype=torch.float64), torch.diag(torch.tensor(degree, dtype=torch.float64)), *derivative]
        self.register_buffer("gradient_operator", torch.cat(ops, dim=1))
        deg_sum = torch.zeros(len(exps), self.max_degree + 1, dtype=torch.float64)
        deg_sum[torch.arange(len(exps)), torch.tensor(degree)] = 1.0  # Σ over monomials of one degree
        self.register_buffer("degree_sum", deg_sum)
        lz = torch.zeros(self.max_degree + 1, len(zeta) * len(lambdas), dtype=torch.float64)
        for col, (z, l) in enumerate((z, l) for z in zeta for l in lambdas):
            for n in range(z + 1):
                lz[n, col] = 2.0 ** (1 - z) * math.comb(z, n) * float(l) ** n  # (1+λc)^ζ = Σ_n C(ζ,n) λ^n c^n
        self.register_buffer("lambda_zeta", lz)

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
        x = torch.clamp(r, max=self.cutoff) * (math.pi / self.cutoff)
        fc = 0.5 * (torch.cos(x) + 1.0)  # cos(π) = -1 exactly: fc = 0 at r >= rc
        dfc = torch.sin(x) * (r < self.cutoff).to(r.dtype) * (-0.5 * math.pi / self.cutoff)
        return fc, dfc

    def pair_basis(self, vec: torch.Tensor) -> PairBasis:
        """Radial weights, their derivatives and monomials of every neighbour slot of (N, E, W, 3)."""
        dtype = vec.dtype
        components = vec.permute(3, 0, 1, 2).contiguous()  # (3, N, E, W)
        x, y, z = components
        r = torch.sqrt(x * x + y * y + z * z)  # (faster than vector_norm over a leading dim)
        u = components * (1.0 / r)
        fc, dfc = self._cutoff_fn(r)
        # All exponentials at once: radial etas with their shifts, then angular etas (shift 0).
        eta, shift = self.all_eta.to(dtype)[:, None], self.all_shift.to(dtype)[:, None]
        r_, fc_, dfc_ = r[:, :, None, :], fc[:, :, None, :], dfc[:, :, None, :]
        dr = r_ - shift
        gauss = torch.exp(dr * dr * -eta)
        w = gauss * fc_
        dw = gauss * (dfc_ - (2.0 * eta) * dr * fc_)
        nr = self.n_radial
        w_ang, dw_ang = w[:, :, nr:], dw[:, :, nr:]
        w_rad = torch.cat([w[:, :, :nr], w_ang * w_ang], dim=2)
        dw_rad = torch.cat([dw[:, :, :nr], 2.0 * w_ang * dw_ang], dim=2)
        return PairBasis(r, u.permute(1, 2, 0, 3), w_rad, dw_rad, w_ang, dw_ang, self.monomials(u))

    def monomials(self, u: torch.Tensor) -> torch.Tensor:
        """u_x^a u_y^b u_z^c for all |α| <= max ζ, from u (3, ...) -> (..., n_mono, W).

        Built from whole contiguous arrays (one multiplication per monomial): far faster than
        gathering powers.  The sqrt-multinomial scale is applied on the per-atom side.
        """
        x, y, z = u[0], u[1], u[2]
        level = [torch.ones_like(x)]
        out = list(level)
        z_power = level[0]
        for n in range(1, self.max_degree + 1):
            z_power = z_power * z
            level = [x * m for m in level] + [y * m for m in level[-n:]] + [z_power]
            out.extend(level)
        return torch.stack(out, dim=-2)

    def moments(self, basis: PairBasis) -> Moments:
        """Per-atom, per-neighbour-element sums of the radial weights and weight × monomial."""
        radial = basis.w_rad.sum(-1)
        angular = (basis.w_ang @ basis.monomials.transpose(-1, -2)) * self.mono_scale.to(basis.r.dtype)
        return Moments(radial, angular)

    # -- features

    def _element_pairs(self, n_elements: int, device):
        key = (n_elements, str(device))
        cached = self._pair_cache.get(key)
        if cached is None:
            pairs = list(combinations_with_replacement(range(n_elements), 2))
            first = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=device)
            second = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=device)
            cached = self._pair_cache[key] = (first, second, (first == second))
        return cached

    def features_from_moments(self, moments: Moments) -> torch.Tensor:
        """G (..., N, F); differentiable (quadratic in the moments)."""
        nr = self.n_radial
        radial = moments.radial[..., :nr].flatten(-2)
        self_terms = moments.radial[..., nr:]  # Σ_j w_j²: the j = k terms to remove
        ang = moments.angular
        dtype = ang.dtype
        n_el = ang.shape[-3]
        if n_el == 1:  # one element pair: no gathers
            t = (ang * ang) @ self.degree_sum.to(dtype) - self_terms[..., None]
        else:
            first, second, same = self._element_pairs(n_el, ang.device)
            products = ang[..., first, :, :] * ang[..., second, :, :]  # (..., pairs, n_eta, n_mono)
            t = products @ self.degree_sum.to(dtype)  # Σ_{j,k} w_j w_k (u_j·u_k)^n
            same = same.to(dtype)
            t = t * (2.0 - same)[:, None, None] - (self_terms[..., first, :] * same[:, None])[..., None]
        angular = (t @ self.lambda_zeta.to(dtype)).flatten(-3)
        return torch.cat([radial, angular], dim=-1)

    def features(self, graph: NeighbourGraph) -> torch.Tensor:
        """G (N, F) of every atom (differentiable with respect to ``graph.vec``)."""
        if self.angular == "g4":
            return self.triplet_features(graph, include_jk=True)
        return self.features_from_moments(self.moments(self.pair_basis(graph.vec)))

    def slot_gradients(self, grad: Moments, basis: PairBasis) -> torch.Tensor:
        """dE/dvec (N, E, W, M, 3) from dE/d(moments) (M, N, E, ...), analytically.

        The angular part contracts the per-atom gradient with [Ỹ, |α|Ỹ, ∂Ỹ/∂u] through one
        batched matrix product per (atom, element) for all M ensemble members at once.
        """
        g_rad, g_ang = grad.radial, grad.angular  # (M, N, E, R), (M, N, E, ne, nm)
        n_members, n_atoms, n_el, n_eta, n_mono = g_ang.shape
        width = basis.r.shape[-1]
        dtype = g_ang.dtype
        operator = self.gradient_operator.to(dtype)
        ops = (g_ang @ operator).view(n_members, n_atoms, n_el, n_eta, 5, n_mono)
        ops = ops.permute(1, 2, 0, 4, 3, 5) * self.mono_scale.to(dtype)  # (N, E, M, 5, ne, nm)
        contracted = ops.reshape(n_atoms, n_el, n_members * 5 * n_eta, n_mono) @ basis.monomials
        contracted = contracted.view(n_atoms, n_el, n_members, 5, n_eta, width)
        w = basis.w_ang[:, :, None]  # (N, E, 1, ne, W)
        dw = basis.dw_ang[:, :, None]
        inv_r = (1.0 / basis.r)[:, :, None]  # (N, E, 1, W)
        along_r = (contracted[:, :, :, 0] * dw).sum(-2) - (contracted[:, :, :, 1] * w).sum(-2) * inv_r
        along_r = along_r + g_rad.permute(1, 2, 0, 3) @ basis.dw_rad  # (N, E, M, W)
        tangential = (contracted[:, :, :, 2:] * w[:, :, :, None]).sum(-2)  # (N, E, M, 3, W)
        grad_vec = basis.u[:, :, None] * along_r[:, :, :, None] + tangential * inv_r[:, :, :, None]
        return grad_vec.permute(0, 1, 4, 2, 3).contiguous()  # (N, E, W, M, 3)

    # -- explicit triplets (G4, and a reference for the moment expansion)

    def triplet_features(self, graph: NeighbourGraph, include_jk: bool = True) -> torch.Tensor:
        """G (N, F) with the angular part summed over explicit triplets (pairs of neighbour slots).

        ``include_jk=True`` is Behler's G4; ``False`` gives G5, equal to the moment expansion.
        """
        n_atoms, n_el, width, _ = graph.vec.shape
        dtype = graph.vec.dtype
        vec = graph.vec.reshape(n_atoms, n_el * width, 3)
        r = torch.linalg.vector_norm(vec, dim=-1)
        fc, _ = self._cutoff_fn(r)
        eta, rs = self.radial_eta.to(dtype), self.radial_shift.to(dtype)
        radial = (torch.exp(-eta * (r[..., None] - rs) ** 2) * fc[..., None]).view(n_atoms, n_el, width, -1).sum(2)
        valid = r < self.cutoff
        pair_mask = valid[:, :, None] & valid[:, None, :]
        pair_mask &= ~torch.eye(n_el * width, dtype=torch.bool, device=r.device)
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
        e_p, e_q = p // width, q // width
        lo, hi = torch.minimum(e_p, e_q), torch.maximum(e_p, e_q)
        pair_index = lo * n_el - lo * (lo - 1) // 2 + (hi - lo)  # order of combinations_with_replacement
        n_pairs = n_el * (n_el + 1) // 2
        angular = values.new_zeros(n_atoms * n_pairs, values.shape[1])
        angular.index_add_(0, atom * n_pairs + pair_index, values)
        return torch.cat([radial.reshape(n_atoms, -1), angular.view(n_atoms, -1)], dim=1)
