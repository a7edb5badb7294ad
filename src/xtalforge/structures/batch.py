"""A batch of S structures as flat tensors (after torch-sim's ``SimState``).

All atoms are concatenated: ``positions (N,3)``, ``numbers (N,)``, ``cell (S,3,3)``
(rows are lattice vectors, as in ASE), ``system_idx (N,)`` says which structure each
atom belongs to.  Per-structure quantities are length-S tensors reduced with
``index_add`` over ``system_idx``; a single structure is simply S = 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from ase import Atoms


@dataclass
class Batch:
    positions: torch.Tensor  # (N, 3) Å, float64
    numbers: torch.Tensor  # (N,) atomic numbers, int64
    cell: torch.Tensor  # (S, 3, 3) Å, rows are lattice vectors
    system_idx: torch.Tensor  # (N,) int64, structure of each atom
    pbc: torch.Tensor = field(default=None)  # (S, 3) bool; defaults to all periodic

    def __post_init__(self) -> None:
        if self.pbc is None:
            self.pbc = torch.ones((self.cell.shape[0], 3), dtype=torch.bool, device=self.cell.device)

    @property
    def n_systems(self) -> int:
        return int(self.cell.shape[0])

    @property
    def n_atoms(self) -> torch.Tensor:
        """Atoms per structure, (S,)."""
        return torch.bincount(self.system_idx, minlength=self.n_systems)

    @property
    def device(self) -> torch.device:
        return self.positions.device

    @property
    def dtype(self) -> torch.dtype:
        return self.positions.dtype

    @property
    def offsets(self) -> torch.Tensor:
        """Index of each structure's first atom, (S,)."""
        return torch.cumsum(self.n_atoms, 0) - self.n_atoms

    @property
    def volume(self) -> torch.Tensor:
        return torch.linalg.det(self.cell).abs()

    @classmethod
    def from_atoms(cls, atoms_list, dtype=torch.float64, device="cpu") -> "Batch":
        if isinstance(atoms_list, Atoms):
            atoms_list = [atoms_list]
        counts = [len(a) for a in atoms_list]
        positions = np.concatenate([a.get_positions() for a in atoms_list]) if atoms_list else np.zeros((0, 3))
        numbers = np.concatenate([a.numbers for a in atoms_list]) if atoms_list else np.zeros(0, int)
        cells = np.stack([np.asarray(a.cell[:]) for a in atoms_list]) if atoms_list else np.zeros((0, 3, 3))
        pbc = np.stack([a.pbc for a in atoms_list]) if atoms_list else np.zeros((0, 3), bool)
        system_idx = np.repeat(np.arange(len(atoms_list)), counts)
        return cls(
            positions=torch.as_tensor(positions, dtype=dtype, device=device),
            numbers=torch.as_tensor(numbers, dtype=torch.long, device=device),
            cell=torch.as_tensor(cells, dtype=dtype, device=device),
            system_idx=torch.as_tensor(system_idx, dtype=torch.long, device=device),
            pbc=torch.as_tensor(pbc, dtype=torch.bool, device=device),
        )

    def to_atoms(self) -> list[Atoms]:
        pos = self.positions.detach().cpu().numpy()
        num = self.numbers.cpu().numpy()
        cell = self.cell.detach().cpu().numpy()
        pbc = self.pbc.cpu().numpy()
        bounds = np.concatenate([[0], np.cumsum(self.n_atoms.cpu().numpy())])
        return [
            Atoms(numbers=num[s:e], positions=pos[s:e], cell=cell[i], pbc=pbc[i])
            for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))
        ]

    def select(self, systems: torch.Tensor) -> "Batch":
        """Sub-batch of the given structure indices (in that order)."""
        systems = torch.as_tensor(systems, dtype=torch.long, device=self.device)
        keep = torch.isin(self.system_idx, systems)
        remap = torch.full((self.n_systems,), -1, dtype=torch.long, device=self.device)
        remap[systems] = torch.arange(len(systems), device=self.device)
        new_idx = remap[self.system_idx[keep]]
        order = torch.argsort(new_idx, stable=True)
        return Batch(
            positions=self.positions[keep][order],
            numbers=self.numbers[keep][order],
            cell=self.cell[systems],
            system_idx=new_idx[order],
            pbc=self.pbc[systems],
        )

    def to(self, device=None, dtype=None) -> "Batch":
        dtype = dtype or self.dtype
        return Batch(
            positions=self.positions.to(device=device, dtype=dtype),
            numbers=self.numbers.to(device=device),
            cell=self.cell.to(device=device, dtype=dtype),
            system_idx=self.system_idx.to(device=device),
            pbc=self.pbc.to(device=device),
        )


@dataclass
class Prediction:
    """What a batched potential returns for a :class:`Batch`.

    ``stress`` follows ASE's sign and units: (1/V) dE/dε in eV/Å³ (positive = tensile).
    Ensemble-only fields are None for a single model.
    """

    energy: torch.Tensor  # (S,) eV
    forces: torch.Tensor  # (N, 3) eV/Å
    stress: torch.Tensor | None = None  # (S, 3, 3) eV/Å³
    energy_std: torch.Tensor | None = None  # (S,)
    forces_std: torch.Tensor | None = None  # (N, 3)
    stress_std: torch.Tensor | None = None  # (S, 3, 3)
    uncertainty: torch.Tensor | None = None  # (S,) U = max|σ_f| / max|f̄| (seed 004 eq. 5)
    features: torch.Tensor | None = None  # (S, F) mean-pooled last-layer features
