"""One counting layer around any ASE calculator.

Each ``calculate`` of :class:`CountingCalculator` is one oracle single point: it asks
the wrapped calculator for energy, forces and stress together, counts the call and its
wall time, and turns failures (exception, NaN, SCF non-convergence, time limit) into
:class:`OracleCallError` after recording them, so callers can mark the structure failed
and go on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress

from xtalforge.timeouts import time_limit


class OracleCallError(RuntimeError):
    """A single point of the oracle failed; the message says why."""


class OracleTimeout(OracleCallError):
    """A single point ran past its time limit."""

    def __init__(self, message: str = "single point ran past its time limit"):
        super().__init__(message)


@dataclass
class OracleStats:
    calls: int = 0
    failures: int = 0
    wall_time: float = 0.0
    failure_reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "calls": self.calls,
            "failures": self.failures,
            "wall_time_s": round(self.wall_time, 3),
            "failure_reasons": self.failure_reasons[-20:],
        }


class CountingCalculator(Calculator):
    """ASE calculator that forwards to ``inner`` and counts every single point."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, inner: Calculator, stats: OracleStats | None = None, timeout_s: float | None = None):
        super().__init__()
        self.inner = inner
        self.stats = stats or OracleStats()
        self.timeout_s = timeout_s

    @property
    def calls(self) -> int:
        return self.stats.calls

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.stats.calls += 1
        start = time.perf_counter()
        try:
            with time_limit(self.timeout_s, OracleTimeout):
                self.results = _evaluate(self.inner, self.atoms, want_stress=self.atoms.cell.rank == 3)
        except Exception as exc:
            self.results = {}
            reason = _describe(exc)
            self.stats.failures += 1
            self.stats.failure_reasons.append(reason)
            raise OracleCallError(reason) from exc
        finally:
            self.stats.wall_time += time.perf_counter() - start


def _evaluate(inner: Calculator, atoms: Atoms, want_stress: bool) -> dict:
    work = atoms.copy()
    work.calc = inner
    energy = float(work.get_potential_energy())
    forces = np.array(work.get_forces(), dtype=float)
    results = {"energy": energy, "free_energy": energy, "forces": forces}
    if want_stress:
        stress = np.asarray(work.get_stress(), dtype=float)
        results["stress"] = full_3x3_to_voigt_6_stress(stress) if stress.shape == (3, 3) else stress
    bad = [k for k, v in results.items() if not np.all(np.isfinite(v))]
    if bad:
        raise FloatingPointError(f"non-finite {', '.join(bad)} from the oracle")
    return results


def _describe(exc: BaseException) -> str:
    name = type(exc).__name__
    if "Convergence" in name or "converge" in str(exc).lower():
        return f"SCF did not converge ({name}: {exc})"
    return f"{name}: {exc}".strip().splitlines()[0][:300]


@dataclass
class OracleResult:
    """Labels of one single point, or why it failed."""

    ok: bool
    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None  # Voigt 6, eV/Å³
    error: str | None = None
    wall_time: float = 0.0
    calls: int = 1

    def to_atoms(self, atoms: Atoms) -> Atoms:
        """Copy of ``atoms`` carrying these labels (as extxyz writes them)."""
        if not self.ok:
            raise ValueError(f"cannot label a failed single point: {self.error}")
        labelled = atoms.copy()
        labelled.calc = SinglePointCalculator(
            labelled, energy=self.energy, free_energy=self.energy, forces=self.forces, stress=self.stress
        )
        return labelled
