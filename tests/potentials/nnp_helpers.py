"""Helpers for the potential tests: small structures, Stillinger–Weber labels, untrained models."""

from __future__ import annotations

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

from xtalforge.potentials import BPNN, SymmetryFunctions
from xtalforge.potentials.training import whitening
from xtalforge.structures.batch import Batch


def sw_calculator():
    from matscipy.calculators.manybody import Manybody
    from matscipy.calculators.manybody.explicit_forms.stillinger_weber import (
        Stillinger_Weber_PRB_31_5262_Si,
        StillingerWeber,
    )

    return Manybody(**StillingerWeber(Stillinger_Weber_PRB_31_5262_Si))


def labelled(atoms: Atoms, calc) -> Atoms:
    """A copy of ``atoms`` carrying the calculator's energy, forces and stress (as from extxyz)."""
    atoms = atoms.copy()
    atoms.calc = calc
    energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    out = atoms.copy()
    out.calc = SinglePointCalculator(out, energy=energy, forces=forces, stress=stress)
    return out


def sw_frames(seed: int, n_strained: int, n_md: int) -> list[Atoms]:
    """Si frames with SW labels: rattled + strained 8- and 16-atom cells, then MD snapshots."""
    from ase import units
    from ase.md.langevin import Langevin

    rng = np.random.default_rng(seed)
    calc = sw_calculator()
    base = bulk("Si", "diamond", a=5.431, cubic=True)
    frames = []
    for k in range(n_strained):
        atoms = base.copy() if k % 2 == 0 else base.repeat((2, 1, 1))
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + rng.uniform(-0.04, 0.04, (3, 3))), scale_atoms=True)
        atoms.positions += rng.normal(0.0, rng.uniform(0.03, 0.15), atoms.positions.shape)
        frames.append(labelled(atoms, calc))
    md = base.copy()
    md.calc = calc
    md.set_momenta(rng.normal(0.0, np.sqrt(units.kB * 1500 * md.get_masses()[:, None]), (len(md), 3)))
    dyn = Langevin(md, 2 * units.fs, temperature_K=1500, friction=0.02, rng=rng, fixcm=False)
    for _ in range(n_md):
        dyn.run(4)
        frames.append(labelled(md, calc))
    return frames


def rattled(atoms: Atoms, seed: int, sigma: float = 0.1, strain: float = 0.03) -> Atoms:
    rng = np.random.default_rng(seed)
    atoms = atoms.copy()
    atoms.set_cell(atoms.cell[:] @ (np.eye(3) + rng.uniform(-strain, strain, (3, 3))), scale_atoms=True)
    atoms.positions += rng.normal(0.0, sigma, atoms.positions.shape)
    return atoms


def ternary_cell(seed: int = 0) -> Atoms:
    """A 16-atom Si/C/Ge cell, rattled and strained (three elements, unequal counts)."""
    atoms = bulk("Si", "diamond", a=5.3, cubic=True).repeat((2, 1, 1))
    atoms.symbols[[0, 3, 9]] = "C"
    atoms.symbols[[5, 12]] = "Ge"
    return rattled(atoms, seed)


def untrained_model(elements, structures, seed: int = 0, descriptor: SymmetryFunctions | None = None,
                    zbl_onset: float = 0.0) -> BPNN:
    """A float64 model with random weights and PCA whitening fitted on ``structures``."""
    model = BPNN(elements, descriptor or SymmetryFunctions(), generator=torch.Generator().manual_seed(seed))
    graph = model.graph(Batch.from_atoms(structures))
    with torch.no_grad():
        features = model.descriptor.features(graph)
    model.set_whitening(*whitening(features, graph.element, len(model.elements)))
    model.set_reference_energies(-np.arange(1.0, len(model.elements) + 1))
    model.set_zbl_onset(torch.full((len(model.elements),) * 2, zbl_onset))
    return model
