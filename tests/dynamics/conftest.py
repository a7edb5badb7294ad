"""Test potentials for the relaxers: a batched torch Lennard-Jones and misbehaving calculators."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.lj import LennardJones

from xtalforge.structures.batch import Batch, Prediction

SIGMA, EPSILON, CUTOFF = 2.0, 1.0, 6.0  # Å, eV, Å: a heavy-noble-gas-like scale


class BatchedLennardJones:
    """Lennard-Jones with ASE's smooth cutoff (``LennardJones(smooth=True)``), batched in torch.

    All pairs of each structure over every periodic image within the cutoff; energy
    by summation, forces and stress by autograd (positions and a strain ε:
    stress = (1/V) ∂E/∂ε). Implements the ``predict(batch, stress)`` model interface.
    """

    def __init__(self, sigma: float = SIGMA, epsilon: float = EPSILON, rc: float = CUTOFF, ro: float | None = None):
        self.sigma, self.epsilon, self.rc = sigma, epsilon, rc
        self.ro = 0.66 * rc if ro is None else ro
        self.calls = 0

    def predict(self, batch: Batch, stress: bool = True) -> Prediction:
        self.calls += 1
        positions = batch.positions.detach().clone().requires_grad_(True)
        strain = torch.zeros_like(batch.cell, requires_grad=True)
        deform = torch.eye(3, dtype=batch.dtype) + strain
        pos = torch.einsum("nj,njk->nk", positions, deform[batch.system_idx])
        cell = batch.cell @ deform
        energy = self._energy(pos, cell, batch.system_idx, batch.n_systems)
        grad_pos, grad_strain = torch.autograd.grad(energy.sum(), [positions, strain])
        volume = torch.linalg.det(batch.cell).abs()
        return Prediction(
            energy=energy.detach(),
            forces=-grad_pos,
            stress=grad_strain / volume[:, None, None] if stress else None,
        )

    def _energy(self, pos, cell, system_idx, n_systems):
        first, second = torch.nonzero(system_idx[:, None] == system_idx[None, :], as_tuple=True)
        system = system_idx[first]
        shifts = self._shifts(cell.detach())
        delta = pos[second] - pos[first]
        vectors = delta[:, None, :] + torch.einsum("mk,pkl->pml", shifts, cell[system])  # (P, M, 3)
        r2 = (vectors**2).sum(-1)
        zero_shift = (shifts.abs().sum(1) == 0)[None, :]
        inside = (r2 < self.rc**2) & ~((first == second)[:, None] & zero_shift)
        r2 = torch.where(inside, r2, torch.full_like(r2, self.rc**2))
        c6 = (self.sigma**2 / r2) ** 3
        pair = 4 * self.epsilon * (c6**2 - c6) * self._cutoff(r2) * inside
        return torch.zeros(n_systems, dtype=pos.dtype).index_add(0, system, 0.5 * pair.sum(1))

    def _cutoff(self, r2):
        rc2, ro2 = self.rc**2, self.ro**2
        smooth = (rc2 - r2) ** 2 * (rc2 + 2 * r2 - 3 * ro2) / (rc2 - ro2) ** 3
        return torch.where(r2 < ro2, torch.ones_like(r2), torch.where(r2 < rc2, smooth, torch.zeros_like(r2)))

    def _shifts(self, cell):
        # Enough images along each axis to cover the cutoff in the thinnest cell.
        volume = torch.linalg.det(cell).abs()
        cross = torch.linalg.cross(cell[:, [1, 2, 0]], cell[:, [2, 0, 1]])
        widths = volume[:, None] / torch.linalg.norm(cross, dim=-1)
        n = math.ceil(float((self.rc / widths).max()))
        r = torch.arange(-n, n + 1, dtype=cell.dtype)
        return torch.cartesian_prod(r, r, r)


def ase_lj() -> LennardJones:
    """ASE's calculator for the same potential."""
    return LennardJones(sigma=SIGMA, epsilon=EPSILON, rc=CUTOFF, smooth=True)


class CollapsingCalculator(Calculator):
    """Wraps a calculator and misbehaves after ``after`` good evaluations.

    mode "hole": energy -1e14 eV/atom (SevenNet-0 on collapsed structures);
    "nan": NaN forces; "raise": an exception.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, inner: Calculator, mode: str, after: int = 0):
        super().__init__()
        self.inner, self.mode, self.after, self.evaluations = inner, mode, after, 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.evaluations += 1
        work = self.atoms.copy()
        work.calc = self.inner
        energy = work.get_potential_energy()
        self.results = {"energy": energy, "free_energy": energy, "forces": work.get_forces(), "stress": work.get_stress()}
        if self.evaluations <= self.after:
            return
        if self.mode == "raise":
            raise RuntimeError("SCF exploded")
        if self.mode == "hole":
            self.results["energy"] = self.results["free_energy"] = -1e14 * len(work)
        if self.mode == "nan":
            self.results["forces"] = np.full_like(self.results["forces"], np.nan)


class FlatEnergyCalculator(Calculator):
    """Real forces and stress but a constant energy: the energy never decreases (stall)."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, inner: Calculator):
        super().__init__()
        self.inner = inner

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        work = self.atoms.copy()
        work.calc = self.inner
        self.results = {"energy": 0.0, "free_energy": 0.0, "forces": work.get_forces(), "stress": work.get_stress()}


def lj_structures(seed: int = 0) -> list[Atoms]:
    """A few small fcc LJ crystals of different sizes, rattled and strained."""
    rng = np.random.default_rng(seed)
    a = 2 ** (2 / 3) * SIGMA  # fcc lattice constant at the pair minimum
    cells = [bulk("Ar", "fcc", a=a, cubic=True), bulk("Ar", "fcc", a=a) * (2, 2, 1),
             bulk("Ar", "fcc", a=a, cubic=True) * (1, 1, 2), bulk("Ar", "fcc", a=a, cubic=True)]
    out = []
    for atoms in cells:
        strain = rng.normal(scale=0.03, size=(3, 3))
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + 0.5 * (strain + strain.T)), scale_atoms=True)
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        out.append(atoms)
    return out


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Tiny tensors on a shared 2-core machine: a second OpenMP thread only adds contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Helpers reach the tests as fixtures (test directories have no __init__.py, so a
# plain ``import conftest`` could pick up another directory's conftest).


@pytest.fixture
def lj_model() -> BatchedLennardJones:
    return BatchedLennardJones()


@pytest.fixture
def make_ase_lj():
    return ase_lj


@pytest.fixture
def make_lj_structures():
    return lj_structures


@pytest.fixture
def collapsing_calculator():
    return CollapsingCalculator


@pytest.fixture
def flat_energy_calculator():
    return FlatEnergyCalculator
