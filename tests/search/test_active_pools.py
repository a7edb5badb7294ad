"""Pools of the active-learning search: files, generation bookkeeping, batched relaxation and evaluation."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.lj import LennardJones

from xtalforge.errors import CheckpointError, XtalforgeError
from xtalforge.search.pools import (
    SEARCH,
    TRAINING,
    TRAINING_OFFSET,
    Pool,
    PoolRelaxSettings,
    evaluate_pool,
    generate_pool,
    pool_spec,
    relax_pool,
)
from xtalforge.structures.batch import Prediction


class LJModel:
    """A batched-interface model backed by ASE's Lennard-Jones, one structure at a time.

    Deterministic per structure, so a structure's prediction does not depend on the
    batch it is in; ``features`` are a smeared distance histogram, ``uncertainty`` a
    constant.
    """

    def __init__(self, uncertainty: float = 0.1):
        self.calc = LennardJones(sigma=2.1, epsilon=0.5, rc=5.0, smooth=True)
        self.u = uncertainty
        self.calls = 0

    def predict(self, batch, stress=True, features=False):
        self.calls += 1
        energies, forces, stresses, feats = [], [], [], []
        for atoms in batch.to_atoms():
            atoms.calc = self.calc
            energies.append(atoms.get_potential_energy())
            forces.append(atoms.get_forces())
            stresses.append(atoms.get_stress(voigt=False))
            d = atoms.get_all_distances(mic=True)[np.triu_indices(len(atoms), 1)]
            feats.append(np.exp(-((d[:, None] - np.linspace(2.0, 5.0, 6)) ** 2)).sum(0) / len(atoms))
        t = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float64)
        return Prediction(
            energy=t(energies), forces=t(np.concatenate(forces)), stress=t(stresses) if stress else None,
            uncertainty=torch.full((batch.n_systems,), self.u, dtype=torch.float64),
            features=t(feats) if features else None,
        )


def _random_structures(n, n_atoms=6, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        a = 4.6 + 0.4 * rng.random()
        atoms = Atoms("Ar" * n_atoms, scaled_positions=rng.random((n_atoms, 3)), cell=np.eye(3) * a, pbc=True)
        if atoms.get_all_distances(mic=True)[np.triu_indices(n_atoms, 1)].min() > 1.9:
            out.append(atoms)
    return out


def _pool(structures, origin=None):
    n = len(structures)
    return Pool(
        atoms=structures, origin=np.asarray(origin if origin is not None else [SEARCH] * n),
        candidate=np.arange(n), initial_spacegroup=np.zeros(n, int),
        status=np.full(n, "initial", dtype="U16"), n_steps=np.zeros(n, int),
    )


def test_pool_spec_and_generation_skip_failing_spacegroups():
    spec = pool_spec([1, 2, 227], per_spacegroup=2, training_size=3)
    assert spec.spacegroups == [1, 1, 2, 2, 227, 227, 0, 0, 0]
    assert spec.origin.count(TRAINING) == 3 and spec.origin.count(SEARCH) == 6
    assert len(set(spec.candidates)) == 9 and min(c for c, o in zip(spec.candidates, spec.origin) if o == TRAINING) == TRAINING_OFFSET
    random_spec = pool_spec([], 30, 2, search_mode="random", search_size=4)
    assert random_spec.modes == ["random"] * 6 and random_spec.origin == [SEARCH] * 4 + [TRAINING] * 2

    calls = []

    def generate(candidate, mode, sg, origin):
        calls.append(candidate)
        if sg == 2:
            raise XtalforgeError("impossible Wyckoff combination")
        return Atoms("Ar", cell=np.eye(3) * 3, pbc=True, info={"candidate": candidate})

    pool = generate_pool(spec, generate, progress=False)
    assert len(pool) == 7  # both space-group-2 candidates missing
    assert 3 not in calls  # the second candidate of a failing space group is not tried
    assert pool.initial_spacegroup.tolist() == [1, 1, 227, 227, 0, 0, 0]
    assert (pool.status == "initial").all() and np.isnan(pool.energy_per_atom).all()


def test_pool_file_round_trip(tmp_path):
    structures = _random_structures(3) + [Atoms("Ar2", positions=[[0, 0, 0], [1.5, 1.5, 1.5]], cell=np.eye(3) * 3.2, pbc=True)]
    pool = _pool(structures, origin=[SEARCH, SEARCH, TRAINING, TRAINING])
    pool = evaluate_pool(LJModel(), pool)
    pool.status[1] = "failed"
    pool.cluster[:] = [0, -1, 0, 1]
    path = pool.save(tmp_path / "pool.npz")
    loaded = Pool.load(path)
    assert len(loaded) == 4 and [len(a) for a in loaded.atoms] == [6, 6, 6, 2]
    for a, b in zip(pool.atoms, loaded.atoms):
        assert np.allclose(a.positions, b.positions) and np.allclose(a.cell, b.cell) and (a.numbers == b.numbers).all()
    for name in ("origin", "candidate", "status", "cluster", "n_steps"):
        assert np.array_equal(getattr(pool, name), getattr(loaded, name)), name
    assert np.allclose(pool.energy_per_atom, loaded.energy_per_atom, equal_nan=True)
    assert np.allclose(pool.features, loaded.features, atol=1e-6)
    assert loaded.usable.tolist() == [True, False, True, True]

    (tmp_path / "bad.npz").write_bytes(b"not a pool")
    with pytest.raises(CheckpointError, match="unreadable"):
        Pool.load(tmp_path / "bad.npz")


def test_evaluation_matches_the_model_and_isolates_a_broken_structure():
    structures = _random_structures(4, seed=1)
    model = LJModel()
    pool = _pool(structures)
    evaluated = evaluate_pool(model, pool, chunk=3)
    for i, atoms in enumerate(structures):
        atoms = atoms.copy()
        atoms.calc = model.calc
        assert evaluated.energy_per_atom[i] == pytest.approx(atoms.get_potential_energy() / len(atoms))
        assert evaluated.max_force[i] == pytest.approx(np.linalg.norm(atoms.get_forces(), axis=1).max())
    assert evaluated.features.shape == (4, 6) and np.allclose(evaluated.uncertainty, 0.1)

    class Broken(LJModel):
        def predict(self, batch, stress=True, features=False):
            if any(np.isclose(a.cell[0, 0], structures[2].cell[0, 0]) for a in batch.to_atoms()):
                raise RuntimeError("model failure")
            return super().predict(batch, stress, features)

    partial = evaluate_pool(Broken(), pool, chunk=4)
    assert np.isnan(partial.energy_per_atom[2])
    assert np.allclose(np.delete(partial.energy_per_atom, 2), np.delete(evaluated.energy_per_atom, 2))


def test_batched_pool_relaxation_equals_one_by_one():
    structures = _random_structures(3, seed=2)
    settings = PoolRelaxSettings(fmax=0.05, smax_gpa=0.5, max_steps=40, patience=20, u_max=None)
    together = relax_pool(LJModel(), _pool(structures), settings, progress=False)
    for i, atoms in enumerate(structures):
        alone = relax_pool(LJModel(), _pool([atoms]), settings, progress=False)
        assert alone.status[0] == together.status[i]
        assert alone.n_steps[0] == together.n_steps[i]
        assert np.allclose(alone.atoms[0].positions, together.atoms[i].positions, atol=1e-8)
        assert alone.energy_per_atom[0] == pytest.approx(together.energy_per_atom[i], abs=1e-9)
    in_pairs = relax_pool(LJModel(), _pool(structures), settings, progress=False, chunk=2)
    assert all(np.allclose(a.positions, b.positions, atol=1e-8) for a, b in zip(in_pairs.atoms, together.atoms))
    # Relaxation lowers every energy, and the input pool is left alone.
    before = evaluate_pool(LJModel(), _pool(structures))
    assert (together.energy_per_atom < before.energy_per_atom).all()
    assert all(np.array_equal(a.positions, b.positions) for a, b in zip(structures, _pool(structures).atoms))


def test_relaxation_stops_on_uncertainty_and_skips_failed_structures():
    structures = _random_structures(3, seed=3)
    pool = _pool(structures)
    pool.status[1] = "failed"
    settings = PoolRelaxSettings(fmax=0.01, smax_gpa=0.5, max_steps=50, u_max=0.05)
    relaxed = relax_pool(LJModel(uncertainty=0.1), pool, settings, progress=False)
    assert relaxed.status.tolist() == ["uncertain", "failed", "uncertain"]
    assert relaxed.n_steps.tolist() == [0, 0, 0]
    assert np.isnan(relaxed.energy_per_atom[1])  # failed structures are not evaluated again
    assert np.array_equal(relaxed.atoms[1].positions, structures[1].positions)
    settled = relax_pool(LJModel(uncertainty=0.1), pool, PoolRelaxSettings(fmax=0.01, smax_gpa=0.5, max_steps=7, u_max=None),
                         progress=False)
    assert settled.n_steps[0] == 7 and settled.status[0] == "max_steps"
    again = relax_pool(LJModel(uncertainty=0.1), settled, PoolRelaxSettings(fmax=0.01, smax_gpa=0.5, max_steps=7, u_max=None),
                       progress=False)
    assert again.n_steps[0] == 14  # steps add up over cycles


class SpreadLJModel(LJModel):
    """LJ forces with a fixed absolute spread σ_f on every force component."""

    def __init__(self, sigma: float):
        super().__init__()
        self.sigma = sigma

    def predict(self, batch, stress=True, features=False):
        pred = super().predict(batch, stress=stress, features=features)
        pred.forces_std = torch.full_like(pred.forces, self.sigma / np.sqrt(3.0))  # |σ_f| = sigma per atom
        return pred


def test_uncertainty_force_floor_bounds_the_spread_near_minima():
    from xtalforge.search.pools import FlooredUncertainty
    from xtalforge.structures.batch import Batch

    structures = _random_structures(2, seed=5)
    relaxed = relax_pool(LJModel(), _pool(structures), PoolRelaxSettings(fmax=0.01, smax_gpa=0.5, max_steps=300, u_max=None),
                         progress=False)
    batch = Batch.from_atoms(relaxed.atoms)
    model = SpreadLJModel(sigma=0.1)
    max_force = torch.as_tensor(relaxed.max_force)
    relative = FlooredUncertainty(model, 0.01).predict(batch).uncertainty
    assert torch.allclose(relative, 0.1 / max_force.clamp(min=0.01), rtol=1e-6)  # eq. 5 above the floor
    floored = FlooredUncertainty(model, 1.0).predict(batch).uncertainty
    assert torch.allclose(floored, torch.full_like(floored, 0.1), rtol=1e-6)  # σ_f / floor at small forces
    # In a pool relaxation the floor decides whether a structure near its minimum may go on.
    pool = _pool(structures)
    strict = relax_pool(model, pool, PoolRelaxSettings(fmax=0.01, smax_gpa=0.5, max_steps=300, u_max=0.5), progress=False)
    lenient = relax_pool(model, pool, PoolRelaxSettings(fmax=0.01, smax_gpa=0.5, max_steps=300, u_max=0.5, u_force_floor=1.0),
                         progress=False)
    assert "uncertain" in strict.status.tolist()
    assert "uncertain" not in lenient.status.tolist()
    assert (lenient.energy_per_atom <= strict.energy_per_atom + 1e-9).all()


def test_pool_generated_in_worker_processes_is_the_serial_pool(caplog):
    import logging

    from xtalforge.config import StructuresConfig
    from xtalforge.search.active import CandidateGenerator, generation_workers
    from xtalforge.structures.composition import Composition
    from xtalforge.structures.constraints import Constraints

    composition = Composition.parse("Si8")
    constraints = Constraints.from_config(composition, StructuresConfig(min_distances={"Si-Si": 1.9}))
    generate = CandidateGenerator(seed=2, search=(composition, constraints), training=(composition, constraints),
                                  max_attempts=50, pyxtal_timeout_s=10.0, cell="conventional")
    spec = pool_spec([227, 230, 141, 12], 3, 60)  # Ia-3d (230) cannot hold 8 atoms; 60 random: two blocks
    log = logging.getLogger("pool-test")
    with caplog.at_level(logging.WARNING, logger="pool-test"):
        serial = generate_pool(spec, generate, progress=False, log=log)
        parallel = generate_pool(spec, generate, progress=False, log=log, workers=2)
    assert len(serial) == len(parallel) == 9 + 60
    assert parallel.candidate.tolist() == serial.candidate.tolist()
    assert parallel.initial_spacegroup.tolist() == serial.initial_spacegroup.tolist()
    assert all(np.allclose(a.positions, b.positions) and np.allclose(a.cell, b.cell)
               for a, b in zip(serial.atoms, parallel.atoms))
    # Space group 230 fails on its first candidate and is not tried again, in either way.
    assert [r.getMessage().split(" not generated")[0] for r in caplog.records] == [
        "pool candidate 3 (symmetric, space group 230)"] * 2
    assert generation_workers(3, 10) == 3 and generation_workers(0, 10) == 1  # small pools stay serial
    assert generation_workers(0, 10_000) >= 1
