"""The oracle: a counted reference calculator plus an executor for batches of work."""

from __future__ import annotations

import time

from ase import Atoms

from xtalforge.config import OracleConfig
from xtalforge.oracles.counting import CountingCalculator, OracleCallError, OracleResult, OracleStats
from xtalforge.oracles.executor import Executor, build_executor
from xtalforge.oracles.registry import build_calculator


class Oracle:
    """A reference calculator whose every single point is counted.

    ``calculator`` is an ASE calculator to attach to Atoms (relaxation, MD); ``label``
    runs single points for a list of structures through the executor.
    """

    def __init__(self, name: str, calculator, *, timeout_s: float | None = None, executor: Executor | None = None):
        self.name = name
        self.stats = OracleStats()
        self.calculator = CountingCalculator(calculator, self.stats, timeout_s=timeout_s)
        self.executor = executor or build_executor("serial")

    @property
    def calls(self) -> int:
        return self.stats.calls

    @property
    def wall_time(self) -> float:
        return self.stats.wall_time

    def single_point(self, atoms: Atoms) -> OracleResult:
        """Energy, forces and stress of ``atoms``; failures come back as ``ok=False``."""
        work = atoms.copy()
        work.calc = self.calculator
        start = time.perf_counter()
        try:
            work.get_potential_energy()
        except OracleCallError as exc:
            return OracleResult(ok=False, error=str(exc), wall_time=time.perf_counter() - start)
        res = self.calculator.results
        return OracleResult(
            ok=True,
            energy=float(res["energy"]),
            forces=res["forces"].copy(),
            stress=res["stress"].copy() if "stress" in res else None,
            wall_time=time.perf_counter() - start,
        )

    def label(self, structures: list[Atoms], desc: str = "oracle labels") -> list[OracleResult]:
        return list(self.executor.map(self.single_point, structures, desc=desc))

    def as_dict(self) -> dict:
        return {"name": self.name, **self.stats.as_dict()}


def build_oracle(config: OracleConfig | None = None, executor: Executor | None = None) -> Oracle:
    config = config or OracleConfig()
    calc = build_calculator(config.name, config.settings)
    return Oracle(config.name, calc, timeout_s=config.timeout_s, executor=executor or build_executor(config.executor))
