"""How oracle work is run: a list of tasks in, results out in the same order.

The search logic only ever calls ``executor.map``; a process pool or a cluster engine
(Dask, SLURM) is another implementation of this one method.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Protocol, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    def map(self, fn: Callable[[T], R], items: Iterable[T], *, desc: str | None = None) -> Iterator[R]: ...


class SerialExecutor:
    """Runs tasks one after another in this process."""

    def __init__(self, progress: bool = True):
        self.progress = progress

    def map(self, fn, items, *, desc=None):
        items = list(items)
        bar = tqdm(items, desc=desc, disable=not self.progress or len(items) < 2, leave=False)
        for item in bar:
            yield fn(item)


EXECUTORS = {"serial": SerialExecutor}


def build_executor(name: str = "serial", **kwargs) -> Executor:
    from xtalforge.errors import ConfigError

    if name not in EXECUTORS:
        raise ConfigError(f"unknown executor {name!r}: choose one of {', '.join(EXECUTORS)}")
    return EXECUTORS[name](**kwargs)
