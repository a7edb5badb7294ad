"""batched_relax: batched FIRE (+ Fréchet cell) against ASE, isolation and stop criteria."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE

from xtalforge.config import RelaxConfig
from xtalforge.dynamics import batched_relax, relax_structure
from xtalforge.structures.batch import Batch, Prediction

TAG = 36  # atomic number marking the structure a test model misbehaves on (LJ ignores species)


class Misbehaving:
    """Wraps a model; structures containing TAG atoms go wrong after ``after`` evaluations."""

    def __init__(self, inner, mode: str, after: int = 0):
        self.inner, self.mode, self.after, self.seen = inner, mode, after, 0
        self.atoms_seen: list[int] = []

    def predict(self, batch: Batch, stress: bool = True) -> Prediction:
        pred = self.inner.predict(batch, stress=stress)
        self.atoms_seen.append(len(batch.numbers))
        tagged = torch.zeros(batch.n_systems, dtype=torch.bool).index_put_(
            (batch.system_idx,), batch.numbers == TAG, accumulate=True)
        if not tagged.any():
            return pred
        self.seen += 1
        if self.mode == "flat":  # energy never decreases
            pred.energy = torch.where(tagged, torch.zeros_like(pred.energy), pred.energy)
        elif self.seen > self.after and self.mode == "nan":
            pred.forces[tagged[batch.system_idx]] = torch.nan
        elif self.seen > self.after and self.mode == "hole":
            pred.energy = torch.where(tagged, torch.full_like(pred.energy, -1e14), pred.energy)
        return pred


class ForceUncertainty:
    """Adds U = max|f| / (1 eV/Å) per structure, a stand-in for an ensemble's relative σ_f."""

    def __init__(self, inner):
        self.inner = inner

    def predict(self, batch: Batch, stress: bool = True) -> Prediction:
        pred = self.inner.predict(batch, stress=stress)
        norm = torch.linalg.norm(pred.forces, dim=1)
        pred.uncertainty = torch.zeros(batch.n_systems, dtype=norm.dtype).scatter_reduce(
            0, batch.system_idx, norm, reduce="amax")
        return pred


def tagged(atoms):
    atoms = atoms.copy()
    atoms.numbers[:] = TAG
    return atoms


def test_batched_lennard_jones_matches_ase(lj_model, make_ase_lj, make_lj_structures):
    """The test potential itself: energies, forces and stress equal ASE's LennardJones."""
    structures = make_lj_structures()
    pred = lj_model.predict(Batch.from_atoms(structures))
    start = 0
    for k, atoms in enumerate(structures):
        atoms.calc = make_ase_lj()
        end = start + len(atoms)
        assert float(pred.energy[k]) == pytest.approx(atoms.get_potential_energy(), abs=1e-10)
        assert np.allclose(pred.forces[start:end].numpy(), atoms.get_forces(), atol=1e-10)
        assert np.allclose(pred.stress[k].numpy(), atoms.get_stress(voigt=False), atol=1e-10)
        start = end


@pytest.mark.parametrize("pressure_gpa", [0.0, 5.0])
def test_batched_fire_with_cell_equals_ase_fire_with_frechet_filter(
    lj_model, make_ase_lj, make_lj_structures, pressure_gpa
):
    structures = make_lj_structures()
    config = RelaxConfig(smax_gpa=0.5)
    batched = batched_relax(lj_model, structures, smax_gpa=0.5, pressure_gpa=pressure_gpa, progress=False)
    assert lj_model.calls == max(r.n_steps for r in batched) + 1  # one predict per step for the whole batch
    for atoms, got in zip(structures, batched):
        ref = relax_structure(atoms, make_ase_lj(), config, pressure_gpa=pressure_gpa)
        assert ref.status == got.status == "converged"
        assert got.n_steps == ref.n_steps
        # Same trajectory step by step, not only the same end point.
        assert np.allclose(got.energies, ref.energies, rtol=0, atol=1e-9)
        assert got.energy_per_atom == pytest.approx(ref.energy_per_atom, abs=1e-4)
        assert got.enthalpy_per_atom == pytest.approx(ref.enthalpy_per_atom, abs=1e-6)
        assert np.allclose(got.atoms.cell[:], ref.atoms.cell[:], atol=1e-6)
        assert np.allclose(got.atoms.positions, ref.atoms.positions, atol=1e-6)
        assert got.fmax < 0.05 and got.smax_gpa < 0.5


def test_batched_fire_fixed_cell_equals_ase_fire(lj_model, make_ase_lj, make_lj_structures):
    structures = make_lj_structures(seed=1)
    batched = batched_relax(lj_model, structures, fmax=0.02, progress=False)
    for atoms, got in zip(structures, batched):
        work = atoms.copy()
        work.calc = make_ase_lj()
        energies = []
        opt = FIRE(work, logfile=None)
        opt.attach(lambda log=energies, atoms=work: log.append(atoms.get_potential_energy()))
        opt.run(fmax=0.02, steps=300)
        assert got.status == "converged" and got.smax_gpa is None
        assert got.n_steps == opt.nsteps
        assert np.allclose(got.energies, energies, rtol=0, atol=1e-9)
        assert np.allclose(got.atoms.cell[:], atoms.cell[:])  # cell untouched
        assert np.allclose(got.atoms.positions, work.positions, atol=1e-8)


def test_first_cell_steps_follow_ase_frechet_filter(lj_model, make_ase_lj, make_lj_structures):
    """Geometry after each of the first steps, compared coordinate by coordinate."""
    atoms = make_lj_structures(seed=2)[2]
    work = atoms.copy()
    work.calc = make_ase_lj()
    opt = FIRE(FrechetCellFilter(work), logfile=None)
    for steps in range(1, 6):
        opt.run(fmax=1e-9, steps=1)
        got = batched_relax(lj_model, [atoms], fmax=1e-9, smax_gpa=1e-9, max_steps=steps, progress=False)[0]
        assert got.status == "max_steps" and got.n_steps == steps
        assert np.allclose(got.atoms.cell[:], work.cell[:], atol=1e-10)
        assert np.allclose(got.atoms.positions, work.positions, atol=1e-10)


def test_nan_in_one_structure_leaves_the_others_untouched(lj_model, make_lj_structures):
    structures = make_lj_structures()
    clean = batched_relax(lj_model, structures, smax_gpa=0.5, progress=False)
    poisoned = [*structures[:2], tagged(structures[2]), *structures[3:]]
    model = Misbehaving(lj_model, "nan", after=3)
    results = batched_relax(model, poisoned, smax_gpa=0.5, progress=False)
    bad = results[2]
    assert bad.status == "failed" and "non-finite" in bad.reason and bad.n_steps == 3
    assert bad.atoms.calc is None and len(bad.energies) == 3
    for k in (0, 1, 3):
        assert results[k].status == clean[k].status == "converged"
        assert results[k].n_steps == clean[k].n_steps
        assert np.allclose(results[k].atoms.positions, clean[k].atoms.positions, rtol=0, atol=1e-12)
        assert np.allclose(results[k].atoms.cell[:], clean[k].atoms.cell[:], rtol=0, atol=1e-12)


def test_energy_hole_fails_only_that_structure(lj_model, make_lj_structures):
    structures = make_lj_structures()
    structures[0] = tagged(structures[0])
    results = batched_relax(Misbehaving(lj_model, "hole", after=2), structures, smax_gpa=0.5, progress=False)
    assert results[0].status == "failed" and "sanity bounds" in results[0].reason
    assert results[0].n_steps == 2 and results[0].energy_per_atom < -1e12
    assert all(r.status == "converged" for r in results[1:])


def test_overlapping_structure_never_reaches_the_model(lj_model, make_lj_structures):
    structures = make_lj_structures()
    overlapping = structures[1].copy()
    overlapping.positions[1] = overlapping.positions[0] + [0.3, 0.0, 0.0]
    model = Misbehaving(lj_model, "none")
    results = batched_relax(model, [overlapping, structures[0]], smax_gpa=0.5, progress=False)
    assert results[0].status == "failed" and "minimum-distance" in results[0].reason
    assert results[0].n_steps == 0 and results[0].energy is None
    assert max(model.atoms_seen) == len(structures[0])
    assert results[1].status == "converged"


def test_min_distance_matrix_fn_sets_pair_limits(lj_model, make_lj_structures):
    structures = make_lj_structures()
    # Nearest neighbours sit near 2.24 Å; 0.5 × 5 Å = 2.5 Å flags every structure.
    results = batched_relax(lj_model, structures, min_distance_matrix_fn=lambda z: np.full((len(z), len(z)), 5.0),
                            progress=False)
    assert all(r.status == "failed" and r.n_steps == 0 for r in results)
    results = batched_relax(lj_model, structures, min_distance_matrix_fn=lambda z: np.full((len(z), len(z)), 3.0),
                            progress=False)
    assert all(r.status == "converged" for r in results)


class Expanding:
    """E = -c·V, no forces, stress -c: a constant drive that inflates every cell."""

    def predict(self, batch: Batch, stress: bool = True) -> Prediction:
        c = 0.05
        return Prediction(energy=-c * batch.volume, forces=torch.zeros_like(batch.positions),
                          stress=-c * torch.eye(3, dtype=batch.dtype).expand(batch.n_systems, 3, 3).clone())


@pytest.mark.parametrize("config, reason", [
    (RelaxConfig(max_volume_factor=3.0), "exploding cell: volume exceeds 3 ×"),
    (RelaxConfig(max_volume_factor=1e6, max_lattice_length=12.0), "lattice vector longer than 12 Å"),
])
def test_exploding_cell_is_caught(make_lj_structures, make_ase_lj, config, reason):
    structures = make_lj_structures()[:2]
    results = batched_relax(Expanding(), structures, smax_gpa=0.5, config=config, progress=False)
    for atoms, result in zip(structures, results):
        assert result.status == "failed" and reason in result.reason
        assert result.n_steps > 0 and result.energy is None  # caught before the model saw that cell
        assert result.atoms.get_volume() > atoms.get_volume()


def test_uncertain_structures_stop_and_others_do_not_notice(lj_model, make_lj_structures):
    structures = make_lj_structures()
    shaken = structures[3].copy()
    shaken.positions += np.random.default_rng(5).normal(scale=0.15, size=shaken.positions.shape)
    clean = batched_relax(lj_model, structures[:3], smax_gpa=0.5, progress=False)
    initial_u = ForceUncertainty(lj_model).predict(Batch.from_atoms([*structures[:3], shaken])).uncertainty
    u_max = float(initial_u[:3].max()) + 0.1
    assert float(initial_u[3]) > u_max
    results = batched_relax(ForceUncertainty(lj_model), [*structures[:3], shaken], smax_gpa=0.5, u_max=u_max,
                            progress=False)
    assert results[3].status == "uncertain" and results[3].n_steps == 0 and results[3].ok
    assert results[3].uncertainty == pytest.approx(float(initial_u[3]))
    for got, ref in zip(results[:3], clean):
        assert got.status == "converged" and got.n_steps == ref.n_steps
        assert got.uncertainty < 0.05  # U follows the forces down
        assert np.allclose(got.atoms.positions, ref.atoms.positions, rtol=0, atol=1e-12)


def test_each_structure_stops_on_its_own_criterion(lj_model, make_lj_structures):
    structures = make_lj_structures()
    free = batched_relax(lj_model, structures, smax_gpa=0.5, patience=7, progress=False)
    limit = 55
    structures[1] = tagged(structures[1])  # flat energy for this one
    results = batched_relax(Misbehaving(lj_model, "flat"), structures, smax_gpa=0.5, max_steps=limit, patience=7,
                            progress=False)
    assert results[1].status == "stalled" and results[1].n_steps == 7 and "7 steps" in results[1].reason
    for k in (0, 2, 3):
        expected = free[k].status if free[k].n_steps <= limit else "max_steps"
        assert results[k].status == expected and results[k].ok
        assert results[k].n_steps == min(free[k].n_steps, limit)
    # This set exercises every criterion: FIRE's energy is not monotonic, so one structure stalls on its own.
    assert {r.status for r in results} == {"converged", "stalled", "max_steps"}
    assert sorted(r.status for r in results).count("stalled") == 2
    for result in results:
        assert len(result.energies) == result.n_steps + 1
        assert result.atoms.get_potential_energy() == pytest.approx(result.energy)


def test_batch_input_and_already_converged_structures(lj_model, make_lj_structures):
    structures = make_lj_structures()
    first = batched_relax(lj_model, Batch.from_atoms(structures), smax_gpa=0.5, progress=False)
    again = batched_relax(lj_model, [r.atoms for r in first], smax_gpa=0.5, progress=False)
    for before, after in zip(first, again):
        assert after.status == "converged" and after.n_steps == 0
        assert after.energy == pytest.approx(before.energy, abs=1e-12)


def test_pair_guard_matches_ase_neighbour_list():
    """Shortest image distance per structure, thick and thin (self-image) cells, vs ase.neighborlist."""
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    from xtalforge.dynamics.guards import PairList

    rng = np.random.default_rng(7)
    structures = []
    for n, scale in [(4, 4.0), (4, 4.0), (6, 1.3), (1, 1.1), (3, 2.0)]:
        cell = scale * (np.eye(3) + 0.25 * rng.uniform(-1, 1, size=(3, 3)))
        structures.append(Atoms("Ar" * n, scaled_positions=rng.uniform(size=(n, 3)), cell=cell, pbc=True))
    limits = [np.full((len(a), len(a)), 1.2) + 0.1 * rng.uniform(size=(len(a), len(a))) for a in structures]
    limits = [0.5 * (m + m.T) for m in limits]
    batch = Batch.from_atoms(structures)
    ratio = PairList.build(batch.system_idx, limits).min_ratio(batch.positions, batch.cell, batch.offsets)
    for atoms, limit, got in zip(structures, limits, ratio.tolist()):
        i, j, d = neighbor_list("ijd", atoms, 6.0)
        assert got == pytest.approx(float((d / limit[i, j]).min()), rel=1e-10)
