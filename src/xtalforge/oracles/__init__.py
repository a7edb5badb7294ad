"""Reference calculators ("oracles"), counted, behind one interface."""

from xtalforge.oracles.counting import CountingCalculator, OracleCallError, OracleResult, OracleStats
from xtalforge.oracles.executor import Executor, SerialExecutor, build_executor
from xtalforge.oracles.oracle import Oracle, build_oracle
from xtalforge.oracles.registry import ORACLES, OracleSpec, build_calculator

__all__ = [
    "ORACLES", "CountingCalculator", "Executor", "Oracle", "OracleCallError", "OracleResult",
    "OracleSpec", "OracleStats", "SerialExecutor", "build_calculator", "build_executor", "build_oracle",
]
