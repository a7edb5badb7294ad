"""Ziegler–Biersack–Littmark screened nuclear repulsion, switched on only at short range.

The NNP has never seen bonds shorter than the shortest distance in its training data and
can predict anything there, including a collapse.  The ZBL term is exactly zero at and
beyond that distance (so it never changes what the network learned) and rises to the full
screened Coulomb repulsion over ``switch_width`` Å below it (seed 000, section III.C: wrong
structures with unphysically short bonds should relax apart instead of collapsing).
"""

from __future__ import annotations

import torch

COULOMB_EV_A = 14.399645  # e²/(4πε₀) in eV·Å
_PHI_C = (0.18175, 0.50986, 0.28022, 0.02817)
_PHI_D = (3.19980, 0.94229, 0.40290, 0.20162)


def zbl_energy(r: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair energy (eV) and its derivative dE/dr of the universal ZBL potential."""
    a = 0.46850 / (z1.to(r.dtype) ** 0.23 + z2.to(r.dtype) ** 0.23)
    x = r / a
    phi = torch.zeros_like(r)
    dphi = torch.zeros_like(r)
    for c, d in zip(_PHI_C, _PHI_D):
        term = c * torch.exp(-d * x)
        phi = phi + term
        dphi = dphi - d * term
    prefactor = COULOMB_EV_A * (z1 * z2).to(r.dtype)
    energy = prefactor * phi / r
    denergy = prefactor * (dphi / (a * r) - phi / (r * r))
    return energy, denergy


def switch(r: torch.Tensor, r_inner: torch.Tensor, r_outer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1 below ``r_inner``, 0 above ``r_outer``, C² smoothstep between; and its derivative."""
    width = (r_outer - r_inner).clamp(min=1e-6)
    t = ((r - r_inner) / width).clamp(0.0, 1.0)
    s = 1.0 - t**3 * (10.0 - 15.0 * t + 6.0 * t * t)
    ds = -30.0 * t * t * (1.0 - t) ** 2 / width
    return s, ds


def switched_zbl(r: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, r_outer: torch.Tensor, width: float):
    """Switched ZBL pair energy and dE/dr; zero for r >= r_outer."""
    energy, denergy = zbl_energy(r, z1, z2)
    s, ds = switch(r, (r_outer - width).clamp(min=0.0), r_outer)
    return energy * s, denergy * s + energy * ds
