"""Oracle registry, counting wrapper and failure handling."""


import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.calculator import Calculator

from xtalforge.config import OracleConfig
from xtalforge.errors import OracleError
from xtalforge.oracles import ORACLES, Oracle, OracleCallError, build_calculator, build_oracle


class FlakyCalculator(Calculator):
    """Test calculator: fails in configurable ways."""

    implemented_properties = ["energy", "forces", "stress"]

    def __init__(self, mode="ok", sleep=0.0, **kwargs):
        super().__init__(**kwargs)
        self.mode, self.sleep = mode, sleep

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        super().calculate(atoms, properties, system_changes)
        if self.mode == "raise":
            raise RuntimeError("boom")
        if self.mode == "scf":
            raise RuntimeError("SCF did not converge after 200 iterations")
        if self.sleep:
            import time

            for _ in range(int(self.sleep / 0.01)):  # Python-level waiting, as an SCF loop would be
                time.sleep(0.01)
        energy = np.nan if self.mode == "nan" else -1.0 * len(self.atoms)
        self.results = {"energy": energy, "forces": np.zeros((len(self.atoms), 3)), "stress": np.zeros(6)}


def test_registry_lists_required_oracles():
    assert {"sevennet", "chgnet", "gpaw", "sw", "emt", "lj"} <= set(ORACLES)
    assert ORACLES["sw"].installed and ORACLES["emt"].installed


def test_unknown_oracle_is_one_line_error():
    with pytest.raises(OracleError, match="unknown oracle 'vasp5'.*module:Class"):
        build_calculator("vasp5")


def test_bad_import_path_and_bad_settings():
    with pytest.raises(OracleError, match="cannot import oracle"):
        build_calculator("nosuchmodule:Calc")
    with pytest.raises(OracleError, match="bad \\[oracle.settings\\]"):
        build_calculator("sw", {"no_such_setting": 1})


def test_missing_optional_oracle_names_the_extra():
    if ORACLES["gpaw"].installed:
        pytest.skip("gpaw is installed")
    with pytest.raises(OracleError, match=r"xtalforge\[dft\]"):
        build_calculator("gpaw")


def test_import_path_oracle_with_settings():
    calc = build_calculator("ase.calculators.lj:LennardJones", {"sigma": 2.1})
    assert calc.parameters.sigma == 2.1


def test_every_single_point_is_counted():
    oracle = build_oracle(OracleConfig(name="sw"))
    si = bulk("Si", "diamond", a=5.43, cubic=True)
    result = oracle.single_point(si)
    assert result.ok and result.energy == pytest.approx(-4.3366 * 8, abs=1e-3)
    assert result.stress.shape == (6,)
    work = si.copy()
    work.calc = oracle.calculator
    for step in range(5):
        work.positions[0, 0] += 0.01
        work.get_forces()
        work.get_stress()  # same geometry: cached, not a new call
    assert oracle.calls == 6
    assert oracle.wall_time > 0


def test_labels_match_direct_calculation():
    oracle = build_oracle(OracleConfig(name="emt"))
    cu = bulk("Cu", "fcc", a=3.6) * (2, 1, 1)
    cu.rattle(0.05, seed=1)
    other = cu.copy()
    other.rattle(0.05, seed=2)
    labelled = oracle.label([cu, other])
    assert [r.ok for r in labelled] == [True, True] and oracle.calls == 2
    ref = cu.copy()
    ref.calc = build_calculator("emt")
    np.testing.assert_allclose(labelled[0].forces, ref.get_forces())
    atoms = labelled[0].to_atoms(cu)
    assert atoms.get_potential_energy() == pytest.approx(ref.get_potential_energy())


@pytest.mark.parametrize("mode,fragment", [("raise", "boom"), ("nan", "non-finite energy"), ("scf", "SCF did not converge")])
def test_failures_are_recorded_not_raised(mode, fragment):
    oracle = Oracle("flaky", FlakyCalculator(mode))
    results = oracle.label([bulk("Si"), bulk("Si", cubic=True)])
    assert [r.ok for r in results] == [False, False]
    assert fragment in results[0].error
    assert oracle.calls == 2 and oracle.stats.failures == 2
    work = bulk("Si")
    work.calc = oracle.calculator
    with pytest.raises(OracleCallError):
        work.get_potential_energy()


def test_per_call_time_limit():
    oracle = Oracle("slow", FlakyCalculator(sleep=2.0), timeout_s=0.2)
    result = oracle.single_point(bulk("Si"))
    assert not result.ok and "time limit" in result.error
    assert result.wall_time < 1.5


