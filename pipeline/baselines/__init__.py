"""Unlearning methods side by side: one registry (`METHODS`), one interface (`base.Method`).

Importing this package registers every method; the runner (`runner.py`) is the only Ray code.
"""
from pipeline.baselines import amnesiac, deltagrad, distill, exact, reversal, sota  # noqa: F401  (importing registers the methods)
from pipeline.baselines.base import METHODS, BaselineError, Method, Outcome, Problem, get

__all__ = ["METHODS", "BaselineError", "Method", "Outcome", "Problem", "get"]
