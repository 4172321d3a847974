"""The one place DP is decided: the per-shard training recipe, noise calibration, accounting.

A sample in slice 0 takes part in every slice stage, so one noise multiplier is calibrated for
the composition of all stages (each with its own Poisson rate q_j = B / n_j and step count).
By parallel composition over disjoint shards the ensemble has the same (ε, δ). The recipe is
fixed at train time and stored: a deletion shrinks n_j but never changes q_j, steps or σ, so
stages that are kept stay bit-identical and replays equal from-scratch training.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache

from opacus.accountants import PRVAccountant, RDPAccountant

from pipeline.config import Config
from pipeline.errors import UserError

ACCOUNTANTS = {"prv": PRVAccountant, "rdp": RDPAccountant}
# Calibration probes tiny σ values, where Opacus's RDP analysis notes that its largest order was
# optimal; the bound it returns is still valid (only looser), and the search moves on.
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
SIGMA_BOUNDS = (0.05, 500.0)


class PrivacyError(UserError, ValueError):
    """The privacy target cannot be met with this schedule."""


@dataclass(frozen=True)
class Stage:
    index: int
    samples: int  # cumulative samples at train time (slices 0..index)
    sample_rate: float
    steps: int


@dataclass(frozen=True)
class Recipe:
    """Everything that fixes a shard's training; stored with the run and reused by retrains."""

    shard: int
    stages: tuple[Stage, ...]
    batch_size: int
    lr: float
    momentum: float
    noise_multiplier: float | None  # None: non-private
    max_grad_norm: float
    epsilon_target: float | None
    epsilon_spent: float | None  # for a sample of slice 0 (the most exposed)
    delta: float
    accountant: str

    @property
    def private(self) -> bool:
        return self.noise_multiplier is not None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        return cls(**{**data, "stages": tuple(Stage(**s) for s in data["stages"])})


def schedule(slice_sizes: list[int], batch_size: int, epochs: float) -> tuple[Stage, ...]:
    """Stage j trains `epochs` epochs over slices 0..j with expected batch `batch_size`."""
    stages, total = [], 0
    for index, size in enumerate(slice_sizes):
        total += size
        rate = min(1.0, batch_size / total)
        stages.append(Stage(index, total, rate, max(1, math.ceil(epochs / rate))))
    return tuple(stages)


def spent_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """ε of composing (noise_multiplier, sample_rate, steps) mechanisms, via Opacus.

    Entries with the same (σ, q) are merged by adding their steps first: composing a mechanism
    n times and then m times is composing it n + m times, so the bound is the same, and a shard's
    history after many replays (each repeats its stages' (σ, q)) costs no more than R entries."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, rate, count in history:
        steps[(sigma, rate)] = steps.get((sigma, rate), 0) + int(count)
    acc = ACCOUNTANTS[accountant]()
    acc.history = [(sigma, rate, count) for (sigma, rate), count in steps.items()]
    return float(acc.get_epsilon(delta=delta))


def _history(stages: tuple[Stage, ...], sigma: float, first: int = 0) -> tuple[tuple[float, float, int], ...]:
    return tuple((sigma, s.sample_rate, s.steps) for s in stages[first:])


@lru_cache(maxsize=256)
def calibrate_noise(stages: tuple[Stage, ...], epsilon: float, delta: float, accountant: str) -> float:
    """Smallest σ (to ~0.5% of ε) whose composed ε over all stages is ≤ the target."""
    low, high = SIGMA_BOUNDS
    if spent_epsilon(_history(stages, high), delta, accountant) > epsilon:
        raise PrivacyError(
            f"privacy.epsilon={epsilon} cannot be met even with σ={high} for this schedule; "
            "raise privacy.epsilon, lower train.epochs or raise the shard size."
        )
    for _ in range(40):
        mid = math.sqrt(low * high)
        eps = spent_epsilon(_history(stages, mid), delta, accountant)
        if eps > epsilon:
            low = mid
        else:
            high = mid
            if eps >= 0.995 * epsilon:
                break
    return high


def make_recipe(config: Config, shard: int, slice_sizes: list[int]) -> Recipe:
    """Fix the shard's training recipe (and calibrate σ when DP is on)."""
    stages = schedule(slice_sizes, config.train.batch_size, config.train.epochs)
    p = config.privacy
    sigma = eps = None
    if p.epsilon is not None:
        sigma = calibrate_noise(stages, p.epsilon, p.delta, p.accountant)
        eps = spent_epsilon(_history(stages, sigma), p.delta, p.accountant)
    return Recipe(shard, stages, config.train.batch_size, config.train.lr, config.train.momentum,
                  sigma, p.max_grad_norm, p.epsilon, eps, p.delta, p.accountant)


def release_epsilon(recipe: Recipe, replayed_from: list[int]) -> float | None:
    """Cumulative ε of the shard's remaining samples after the original training and one replay
    of stages k..R-1 per retrain (k in `replayed_from`): each retrain is a new release."""
    if not recipe.private:
        return None
    history = _history(recipe.stages, recipe.noise_multiplier)
    for first in replayed_from:
        history += _history(recipe.stages, recipe.noise_multiplier, first)
    return spent_epsilon(history, recipe.delta, recipe.accountant)
