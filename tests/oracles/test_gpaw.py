"""Real DFT with GPAW (``make test-dft``): a Si8 single point and a short relaxation."""

import importlib.util

import numpy as np
import pytest
from ase.build import bulk

from xtalforge.config import OracleConfig, RelaxConfig
from xtalforge.oracles import build_oracle

pytestmark = [
    pytest.mark.dft,
    pytest.mark.skipif(importlib.util.find_spec("gpaw") is None, reason="GPAW not installed: run `make test-dft`"),
]

# Small but physical settings: enough for a sane Si energy in seconds on 2 cores.
FAST_PBE = {"ecut": 250.0, "kpoint_density": 1.5, "smearing": 0.1}


def test_si8_single_point():
    oracle = build_oracle(OracleConfig(name="gpaw", settings=FAST_PBE))
    result = oracle.single_point(bulk("Si", "diamond", a=5.43, cubic=True))
    assert result.ok, result.error
    assert -6.5 < result.energy / 8 < -5.0  # PBE Si is about -5.4 eV/atom with GPAW's reference
    assert np.abs(result.forces).max() < 0.05
    assert oracle.calls == 1


def test_short_gpaw_relaxation_lowers_energy():
    from xtalforge.dynamics import relax_structure

    oracle = build_oracle(OracleConfig(name="gpaw", settings=FAST_PBE))
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=0)
    result = relax_structure(atoms, oracle.calculator, RelaxConfig(max_steps=8, smax_gpa=5.0, fmax=0.1))
    assert result.status != "failed", result.reason
    assert result.energies[-1] < result.energies[0]
    assert result.n_calls == oracle.calls >= 2
