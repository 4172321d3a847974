"""Unlearning methods side by side: one registry (`METHODS`), one interface (`base.Method`).

Importing this package registers every method; the runner (`runner.py`) is the only Ray code.
"""
from pipeline.baselines import exact  # noqa: F401  (registers retrain, sisa, dp_nothing)
from pipeline.baselines.base import METHODS, BaselineError, Method, Outcome, Problem, get

__all__ = ["METHODS", "BaselineError", "Method", "Outcome", "Problem", "get"]
