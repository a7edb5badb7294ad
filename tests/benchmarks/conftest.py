"""Benchmark scripts are not a package: tests load them from their files."""

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench(request):
    """The module of ``benchmarks/NAME.py``, NAME being the test module's ``BENCHMARK``."""
    name = request.module.BENCHMARK
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
