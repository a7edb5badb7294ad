"""Fixtures for the potential tests (helpers live in nnp_helpers.py)."""

from __future__ import annotations

import pytest
from ase.build import bulk
from nnp_helpers import rattled, ternary_cell, untrained_model


@pytest.fixture(scope="module")
def si_model():
    cells = [rattled(bulk("Si", "diamond", a=5.431, cubic=True), k) for k in range(4)]
    return untrained_model(["Si"], cells, seed=1)


@pytest.fixture(scope="module")
def ternary_model():
    cells = [ternary_cell(k) for k in range(4)]
    return untrained_model(["C", "Si", "Ge"], cells, seed=2)
