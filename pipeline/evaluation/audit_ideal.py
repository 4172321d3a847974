"""The numbers that make a one-run audit readable: its ceiling and the ideal auditor's bound (pure numpy).

A one-run bound (`audit_bound.best_bound`) of 0 at ε=2 says little until one knows what bound was
attainable. Two references, both through the same Bonferroni-over-the-guess-grid machinery:

- **ceiling** (`epsilon_lower_bound_ceiling`): the randomised-response limit. An (ε, δ)-DP run
  makes each guess right with probability at most p = e^ε/(1+e^ε), and the bound is tight only for
  a mechanism that is exactly ε-randomised response. The ceiling is the bound an auditor gets whose
  r guesses are right in the median number of cases of Binomial(r, p), for every r of the guess
  grid, the best r kept: what the M canaries can show at the claimed ε at all (below ε: M is finite).
- **ideal** (`epsilon_lower_bound_ideal`): the median over simulated runs of an ideal white-box
  auditor of the recorded DP-SGD recipe. Each canary is a gradient of norm C in its own orthonormal
  direction, included by a fair coin and, at every step of stage j, Poisson-sampled at rate q_j;
  every coordinate gets Gaussian noise σC; nothing else (no data gradients, no cross-talk) moves the
  canary's coordinate. Per step the auditor sees y_t = b_t + σ·z_t (in units of C, b_t = 1 when the
  canary is in and sampled), and scores a canary by the sum over steps of the log-likelihood ratio
  of "in" against "out", log(1 − q_t + q_t·exp((y_t − ½)/σ²)): the Neyman–Pearson optimal score.
  DP-SGD's subsampled Gaussian noise is not randomised response, so the ideal lies well below the
  ceiling (≈ 0.5 at ε=2 on the digits schedule with M=1000); a real audit cannot beat it but by chance.

`noise_calibration_p` tests the noise itself: an excluded canary's summed projection is pure noise,
N(0, T·σ²) in units of C, so a run whose noise is smaller (or larger) than its recorded σ shows in
the variance of the excluded canaries' scores (two-sided χ² test).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import expit
from scipy.stats import binom, chi2

from pipeline.evaluation import audit_bound

IDEAL_RUNS = 20
IDEAL_SEED = 0


def ceiling(canaries: int, epsilon: float | None, delta: float, confidence: float = audit_bound.CONFIDENCE,
            fractions: tuple[float, ...] = audit_bound.GUESS_FRACTIONS) -> float | None:
    """The randomised-response limit for `canaries` canaries at the claimed ε (see the module docstring);
    None without DP."""
    if epsilon is None:
        return None
    grid = audit_bound.guess_grid(canaries, fractions)
    alpha = (1 - confidence) / len(grid)
    p = float(expit(epsilon))
    return max(audit_bound.epsilon_lower_bound(canaries, r, int(binom.median(r, p)), delta, alpha) for r in grid)


def step_rates(stages: list[tuple[float, int]]) -> np.ndarray:
    """Per-step Poisson rates of a recipe's stages [(sample_rate, steps), ...], in training order."""
    return np.concatenate([np.full(int(steps), float(rate)) for rate, steps in stages]) if stages else np.zeros(0)


def log_likelihood_ratio(projections: np.ndarray, rates: np.ndarray, sigma: float) -> np.ndarray:
    """Σ_t log(1 − q_t + q_t·exp((y_t − ½)/σ²)) over the last axis (steps): the optimal score of a canary
    whose per-step projections (in units of C) are `projections`, under noise σ."""
    rates = np.asarray(rates, np.float64)
    with np.errstate(divide="ignore"):  # q = 1: log(1 − q) = −inf, and the score is (y − ½)/σ²
        out = np.logaddexp(np.log1p(-rates), np.log(rates) + (np.asarray(projections, np.float64) - 0.5) / sigma ** 2)
    return out.sum(axis=-1)


def simulate_scores(rng: np.random.Generator, included: np.ndarray, rates: np.ndarray, sigma: float) -> np.ndarray:
    """Per-step projections (M × T, in units of C) of the ideal white-box setting: b·Bernoulli(q_t) + N(0, σ²)."""
    m, steps = len(included), len(rates)
    sampled = rng.random((m, steps)) < rates
    return (sampled & included[:, None]) + sigma * rng.standard_normal((m, steps))


@dataclass(frozen=True)
class IdealBound:
    median: float
    p99: float  # 99th percentile over the simulated runs: a real audit above it is suspicious
    low: float
    high: float
    runs: int

    def to_dict(self) -> dict:
        return asdict(self)


def ideal(sigma: float | None, stages: list[tuple[float, int]], canaries: int, delta: float,
          runs: int = IDEAL_RUNS, seed: int = IDEAL_SEED) -> IdealBound | None:
    """The ideal white-box auditor's bound over `runs` simulated runs (median, 99th percentile, range) for
    noise multiplier σ, the recipe's `stages` [(sample_rate, steps), ...] and M `canaries`; None without DP."""
    if not sigma:
        return None
    rng = np.random.default_rng([seed, canaries])
    rates = step_rates(stages)
    bounds = []
    for _ in range(runs):
        included = rng.random(canaries) < 0.5
        scores = log_likelihood_ratio(simulate_scores(rng, included, rates, sigma), rates, sigma)
        bounds.append(audit_bound.best_bound(scores, included, delta).epsilon_lower_bound)
    values = np.asarray(bounds)
    return IdealBound(float(np.median(values)), float(np.quantile(values, 0.99)), float(values.min()),
                      float(values.max()), runs)


def noise_calibration_p(excluded_scores: np.ndarray, steps: int, sigma: float | None) -> float | None:
    """Two-sided χ² test that excluded canaries' summed projections (units of C) have variance T·σ²
    (mean 0 known): a p-value near 0 says the run's noise is not its recorded σ. None without DP."""
    x = np.asarray(excluded_scores, np.float64)
    if not sigma or len(x) == 0:
        return None
    statistic = float(np.sum(x ** 2) / (steps * sigma ** 2))
    return float(min(1.0, 2 * min(chi2.cdf(statistic, len(x)), chi2.sf(statistic, len(x)))))
