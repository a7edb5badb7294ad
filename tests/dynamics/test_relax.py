"""relax_structure: ASE FIRE / L-BFGS + FrechetCellFilter with guards and stop criteria."""

from __future__ import annotations

import io

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.io import read
from matscipy.calculators.manybody import Manybody
from matscipy.calculators.manybody.explicit_forms.stillinger_weber import (
    Stillinger_Weber_PRB_31_5262_Si,
    StillingerWeber,
)

from xtalforge.config import OracleConfig, RelaxConfig
from xtalforge.dynamics import relax_structure
from xtalforge.dynamics.guards import check_close_pairs, pair_thresholds
from xtalforge.oracles import build_oracle

SW_DIAMOND_ENERGY = -4.3366  # eV/atom, Stillinger-Weber diamond Si (a = 5.431 Å)


def stillinger_weber() -> Calculator:
    return Manybody(**StillingerWeber(Stillinger_Weber_PRB_31_5262_Si))


def rattled_silicon(seed: int = 0, scale: float = 1.04) -> Atoms:
    rng = np.random.default_rng(seed)
    atoms = bulk("Si", "diamond", a=5.431, cubic=True)
    atoms.set_cell(atoms.cell[:] * scale, scale_atoms=True)
    atoms.positions += rng.normal(scale=0.08, size=atoms.positions.shape)
    return atoms


class ExpandingCalculator(Calculator):
    """E = -c·V with zero forces: a constant tensile drive (stress -c) that blows the cell up."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, c: float = 0.05):
        super().__init__()
        self.c = c

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        energy = -self.c * self.atoms.get_volume()
        self.results = {
            "energy": energy, "free_energy": energy, "forces": np.zeros((len(self.atoms), 3)),
            "stress": np.array([-self.c, -self.c, -self.c, 0.0, 0.0, 0.0]),
        }


@pytest.mark.parametrize("optimizer", ["FIRE", "LBFGS", "BFGS"])
def test_rattled_diamond_silicon_converges(optimizer):
    atoms = rattled_silicon()
    before = atoms.get_positions().copy()
    result = relax_structure(atoms, stillinger_weber(), RelaxConfig(optimizer=optimizer))
    assert result.status == "converged" and result.reason is None
    assert result.fmax < 0.05 and result.smax_gpa < 2.0
    assert result.energy_per_atom == pytest.approx(SW_DIAMOND_ENERGY, abs=2e-3)
    # The relaxed cell is diamond's: volume per atom of a = 5.431 Å (20.02 Å³) within the stress tolerance.
    assert result.atoms.get_volume() / len(atoms) == pytest.approx(5.431**3 / 8, rel=0.02)
    # Every evaluation is counted once (a plain calculator is wrapped): one per step plus the initial one.
    assert result.n_calls == result.n_steps + 1 == len(result.energies)
    assert result.energies[-1] == pytest.approx(result.energy)
    assert result.atoms.get_potential_energy() == pytest.approx(result.energy)
    assert np.array_equal(atoms.get_positions(), before)  # the input is not modified
    assert np.allclose(result.initial.positions, before)


def test_oracle_calls_are_counted_by_difference():
    oracle = build_oracle(OracleConfig(name="sw"))
    oracle.single_point(rattled_silicon(seed=3))  # calls made before the relaxation are not its own
    start = oracle.calls
    result = relax_structure(rattled_silicon(), oracle.calculator, RelaxConfig())
    assert result.status == "converged"
    assert result.n_calls == oracle.calls - start == result.n_steps + 1


def test_validation_thresholds_are_tighter():
    config = RelaxConfig(validation_optimizer="FIRE")
    search = relax_structure(rattled_silicon(), stillinger_weber(), config)
    validation = relax_structure(rattled_silicon(), stillinger_weber(), config, validation=True)
    assert validation.status == "converged"
    assert validation.fmax < 0.02 and validation.smax_gpa < 0.4
    assert validation.n_steps > search.n_steps


def test_validation_uses_its_own_optimizer():
    same_thresholds = {"validation_fmax": 0.05, "validation_smax_gpa": 2.0, "validation_max_steps": 300}
    bfgs = relax_structure(rattled_silicon(), stillinger_weber(), RelaxConfig(optimizer="BFGS"))
    as_validation = relax_structure(rattled_silicon(), stillinger_weber(),
                                    RelaxConfig(validation_optimizer="BFGS", **same_thresholds), validation=True)
    fire = relax_structure(rattled_silicon(), stillinger_weber(),
                           RelaxConfig(validation_optimizer="FIRE", **same_thresholds), validation=True)
    assert as_validation.n_steps == bfgs.n_steps and as_validation.energies == bfgs.energies
    assert fire.n_steps != bfgs.n_steps


def test_max_steps_stops_early_and_is_usable():
    result = relax_structure(rattled_silicon(), stillinger_weber(), RelaxConfig(max_steps=3))
    assert result.status == "max_steps" and result.ok
    assert result.n_steps == 3 and result.n_calls == 4
    assert result.atoms.calc is not None and np.isfinite(result.energy)


def test_validation_step_limit():
    config = RelaxConfig(max_steps=300, validation_max_steps=2)
    result = relax_structure(rattled_silicon(), stillinger_weber(), config, validation=True)
    assert result.status == "max_steps" and result.n_steps == 2


def test_no_energy_decrease_stalls(flat_energy_calculator):
    config = RelaxConfig(patience=6)
    result = relax_structure(rattled_silicon(), flat_energy_calculator(stillinger_weber()), config)
    assert result.status == "stalled" and result.ok
    assert result.n_steps == 6
    assert "6 steps" in result.reason


@pytest.mark.parametrize(
    "mode, after, expected",
    [("hole", 2, "sanity bounds"), ("nan", 1, "non-finite"), ("raise", 3, "SCF exploded")],
)
def test_misbehaving_calculator_fails_cleanly(mode, after, expected, collapsing_calculator):
    calc = collapsing_calculator(stillinger_weber(), mode, after=after)
    result = relax_structure(rattled_silicon(), calc, RelaxConfig())
    assert result.status == "failed" and not result.ok
    assert expected in result.reason
    assert result.n_steps == after  # stopped at the first bad evaluation
    assert result.n_calls == after + 1
    assert len(result.energies) == after  # bad values never enter the energy history


def test_overlapping_atoms_fail_before_any_call(collapsing_calculator):
    atoms = bulk("Si", "diamond", a=5.431, cubic=True)
    atoms.positions[1] = atoms.positions[0] + [0.3, 0.0, 0.0]
    calc = collapsing_calculator(stillinger_weber(), "raise", after=100)
    result = relax_structure(atoms, calc, RelaxConfig())
    assert result.status == "failed" and "0.300 Å apart" in result.reason
    assert result.n_calls == 0 and calc.evaluations == 0


def test_min_distance_matrix_scales_the_limit():
    atoms = bulk("Si", "diamond", a=5.431, cubic=True)
    atoms.positions[1] = atoms.positions[0] + [1.0, 0.0, 0.0]
    config = RelaxConfig(min_distance_factor=0.5)
    matrix = np.full((8, 8), 2.2)  # 0.5 × 2.2 = 1.1 Å > 1.0 Å
    result = relax_structure(atoms, stillinger_weber(), config, min_distances=matrix)
    assert result.status == "failed" and "1.100 Å limit" in result.reason and result.n_calls == 0
    result = relax_structure(atoms, stillinger_weber(), config, min_distances=lambda numbers: np.full((8, 8), 1.8))
    assert result.n_calls > 0  # 0.9 Å limit: the 1.0 Å pair is allowed to start


def test_pair_thresholds_and_periodic_images():
    numbers = np.array([14, 14])
    assert np.allclose(pair_thresholds(numbers, None, 0.5, 0.5), 0.5)
    assert np.allclose(pair_thresholds(numbers, np.full((2, 2), 3.0), 0.5, 0.5), 1.5)
    assert np.allclose(pair_thresholds(numbers, np.full((2, 2), 0.4), 0.5, 0.5), 0.5)  # floor applies
    with pytest.raises(ValueError, match="expected \\(2, 2\\)"):
        pair_thresholds(numbers, np.ones((3, 3)), 0.5, 0.5)
    # One atom in a 1.2 Å wide cell is 1.2 Å from its own image.
    atoms = Atoms("Si", positions=[[0, 0, 0]], cell=[1.2, 5.0, 5.0], pbc=True)
    assert check_close_pairs(atoms, np.full((1, 1), 1.0)) is None
    assert "below the 1.500 Å limit" in check_close_pairs(atoms, np.full((1, 1), 1.5))


def test_exploding_volume_fails():
    atoms = bulk("Si", "diamond", a=5.431)
    result = relax_structure(atoms, ExpandingCalculator(), RelaxConfig(max_volume_factor=4.0))
    assert result.status == "failed" and "exploding cell: volume" in result.reason
    assert result.atoms.get_volume() > 4.0 * atoms.get_volume()


def test_exploding_lattice_vector_fails():
    atoms = bulk("Si", "diamond", a=5.431)
    config = RelaxConfig(max_volume_factor=1e6, max_lattice_length=8.0)
    result = relax_structure(atoms, ExpandingCalculator(), config)
    assert result.status == "failed" and "lattice vector" in result.reason


def test_pressure_compresses_and_enters_the_enthalpy():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    zero = relax_structure(atoms, EMT(), RelaxConfig(), validation=True)
    squeezed = relax_structure(atoms, EMT(), RelaxConfig(), validation=True, pressure_gpa=10.0)
    assert zero.status == squeezed.status == "converged"
    assert squeezed.atoms.get_volume() < 0.97 * zero.atoms.get_volume()
    # Converged at pressure means stress ≈ -p (ASE sign: compressive is negative).
    stress_gpa = squeezed.atoms.get_stress(voigt=False) / units.GPa
    assert np.allclose(stress_gpa, -10.0 * np.eye(3), atol=0.4)
    pv = 10.0 * units.GPa * squeezed.atoms.get_volume() / len(atoms)
    assert squeezed.enthalpy_per_atom == pytest.approx(squeezed.energy_per_atom + pv)
    assert squeezed.energy_per_atom > zero.energy_per_atom  # compressed away from the minimum
    assert zero.enthalpy_per_atom == pytest.approx(zero.energy_per_atom)


def test_trajectory_and_log_are_written(tmp_path):
    log = io.StringIO()
    path = tmp_path / "relax.traj"
    result = relax_structure(rattled_silicon(), stillinger_weber(), RelaxConfig(max_steps=4), trajectory=path, log=log)
    frames = read(path, ":")
    assert len(frames) == result.n_steps + 1 == 5
    assert np.allclose([f.get_potential_energy() for f in frames], result.energies)
    assert len(log.getvalue().splitlines()) == 1 + 5  # header + one line per evaluated step


def test_molecule_relaxes_positions_only():
    dimer = Atoms("Cu2", positions=[[0, 0, 0], [2.0, 0, 0]])
    result = relax_structure(dimer, EMT(), RelaxConfig())
    assert result.status == "converged" and result.smax_gpa is None
    assert 2.0 < result.atoms.get_distance(0, 1) < 2.6


class HarmonicWell(Calculator):
    """E = k/2 |r - r0|² per atom: its Hessian is k times the identity."""

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, centre: np.ndarray, k: float):
        super().__init__()
        self.centre, self.k = centre, k

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        delta = self.atoms.positions - self.centre
        energy = 0.5 * self.k * float((delta**2).sum())
        self.results = {"energy": energy, "free_energy": energy, "forces": -self.k * delta}


class FailingCalculator(Calculator):
    implemented_properties = ["energy", "forces", "stress"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        raise RuntimeError("model not trained")


def test_model_hessian_is_the_curvature_floored_and_leaves_atoms_alone():
    from xtalforge.dynamics import model_hessian

    atoms = Atoms("Ar3", positions=[[0, 0, 0], [3, 0, 0], [0, 3, 0]])
    before = atoms.positions.copy()
    stiff = model_hessian(atoms, HarmonicWell(atoms.positions + 0.1, k=7.0))
    assert stiff.shape == (9, 9) and np.allclose(stiff, 7.0 * np.eye(9), atol=1e-6)
    # A saddle (negative curvature) and a near-flat mode become positive: |k| and the floor.
    assert np.allclose(model_hessian(atoms, HarmonicWell(atoms.positions, k=-3.0)), 3.0 * np.eye(9), atol=1e-6)
    assert np.allclose(model_hessian(atoms, HarmonicWell(atoms.positions, k=1e-3), min_curvature=0.5),
                       0.5 * np.eye(9), atol=1e-6)
    assert np.array_equal(atoms.positions, before) and atoms.calc is None
    assert model_hessian(atoms, FailingCalculator()) is None


def test_bfgs_from_a_model_hessian_takes_fewer_oracle_steps_to_the_same_minimum():
    config = RelaxConfig(validation_optimizer="BFGS")
    plain = relax_structure(rattled_silicon(seed=4), stillinger_weber(), config, validation=True)
    # The model here is the oracle's own potential: the best case, a Newton start.
    newton = relax_structure(rattled_silicon(seed=4), stillinger_weber(), config, validation=True,
                             hessian_model=stillinger_weber())
    assert plain.status == newton.status == "converged"
    assert plain.hessian == "identity" and newton.hessian == "model"
    assert newton.energy_per_atom == pytest.approx(plain.energy_per_atom, abs=1e-4)
    assert newton.n_calls <= plain.n_calls // 2
    assert newton.n_calls == newton.n_steps + 1  # the model's evaluations are not oracle calls


def test_a_failing_hessian_model_falls_back_and_other_optimizers_refuse_it():
    config = RelaxConfig(validation_optimizer="BFGS")
    result = relax_structure(rattled_silicon(), stillinger_weber(), config, validation=True,
                             hessian_model=FailingCalculator())
    assert result.status == "converged" and result.hessian.startswith("identity (the model Hessian failed")
    with pytest.raises(ValueError, match="needs the BFGS optimizer"):
        relax_structure(rattled_silicon(), stillinger_weber(), RelaxConfig(validation_optimizer="FIRE"),
                        validation=True, hessian_model=stillinger_weber())
