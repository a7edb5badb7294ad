"""Shared fixtures: reference structures, small configs, single-threaded torch."""

from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_limits
from ase.io import read

threadpool_limits(1, user_api="blas")  # 3×3 solves in ASE's cell filter: threads only contend
torch.set_num_threads(1)  # small tensors: threads cost more than they give

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REFERENCE_DIR = SHARED / "reference-structures"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"reference structures not found at {REFERENCE_DIR}")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def si_diamond(reference_dir):
    return read(reference_dir / "Si_diamond_Fd-3m.cif")


@pytest.fixture
def sw_config_file(tmp_path, si_diamond):
    """A minimal random-search config for Si8 with Stillinger-Weber, as written in the issue."""
    si_diamond.write(tmp_path / "diamond.cif")
    path = tmp_path / "search.toml"
    path.write_text(
        'composition = "Si8"\nseed = 0\n[oracle]\nname = "sw"\n[search]\nmethod = "random"\n'
        'max_oracle_calls = 20000\ntarget = "diamond.cif"\n'
    )
    return path
