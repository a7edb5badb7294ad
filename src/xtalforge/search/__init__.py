"""Search strategies: random baseline and active learning, behind one entry point."""

from xtalforge.search.context import RunContext, open_run
from xtalforge.search.outcome import SearchOutcome
from xtalforge.search.runner import SEARCH_METHODS, run_search

__all__ = ["SEARCH_METHODS", "RunContext", "SearchOutcome", "open_run", "run_search"]
