"""The one-run ε lower bound of Steinke, Nasr & Jagielski 2023 ("Privacy auditing with one (1) training run").

m canaries are each included in training independently with probability ½. From the trained model
an auditor guesses "in" for some canaries and "out" for others, r guesses in all (abstaining on the
rest), and v of them are right. Their analysis of an (ε, δ)-DP algorithm bounds the chance of that:

    P[≥ v correct] ≤ f(v) + 2·m·δ · max_{i=1..v} (f(v−i) − f(v)) / i,   f(u) = P[Binomial(r, e^ε/(1+e^ε)) ≥ u]

(for δ = 0 this is the plain binomial tail: DP makes each guess at best an ε-randomised response).
The right side is the p-value of "the algorithm is (ε, δ)-DP"; the lower bound is the largest ε it
rejects at level α (bisection over ε, as in the paper's published routine). The number of guesses is
chosen after the fact from a small grid, so each grid point is tested at α / |grid| (Bonferroni).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import expit
from scipy.stats import binom

CONFIDENCE = 0.95
GUESS_FRACTIONS = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0)  # r / m tried; half "in" (highest scores), half "out" (lowest)
EPSILON_CEILING = 100.0  # e^ε/(1+e^ε) is 1 in float64 long before this


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Largest chance, under (ε, δ)-DP, of ≥ v correct among r guesses on m canaries (see module docstring)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 ≤ correct ({v}) ≤ guesses ({r}) ≤ canaries ({m}).")
    q = float(expit(epsilon))  # accuracy of ε-randomised response
    tail = float(binom.sf(v - 1, r, q))  # f(v) = P[Bin(r, q) ≥ v]
    if delta == 0 or v == 0:
        return min(1.0, tail)
    below = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[Bin = v−1], P[Bin = v−2], …, P[Bin = 0]
    slope = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))  # max_i (f(v−i) − f(v)) / i
    return min(1.0, tail + 2 * m * delta * slope)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, alpha: float = 1 - CONFIDENCE) -> float:
    """Largest ε with p_value ≤ α: with confidence 1 − α the algorithm is not (ε', δ)-DP for any ε' below it."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1); got {alpha}.")
    if r == 0 or p_value(m, r, v, 0.0, delta) > alpha:
        return 0.0
    low, high = 0.0, 1.0  # invariant: p_value(low) ≤ α < p_value(high)
    while p_value(m, r, v, high, delta) <= alpha and high < EPSILON_CEILING:
        low, high = high, 2 * high
    for _ in range(50):
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) <= alpha:
            low = mid
        else:
            high = mid
    return low


def guess_counts(scores: np.ndarray, included: np.ndarray, guesses: int) -> tuple[int, int, int]:
    """(guesses "in", guesses "out", correct) when the ⌈r/2⌉ highest scores are guessed in and the ⌊r/2⌋ lowest out."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    k_in = (guesses + 1) // 2
    k_out = guesses - k_in
    guessed_in, guessed_out = order[:k_in], order[len(order) - k_out:]
    correct = int(included[guessed_in].sum() + (~included[guessed_out]).sum())
    return k_in, k_out, correct


def guess_grid(m: int, fractions: tuple[float, ...] = GUESS_FRACTIONS) -> list[int]:
    """Distinct guess counts r = round(fraction · m), at least 1, at most m."""
    return sorted({min(m, max(1, round(f * m))) for f in fractions})


@dataclass(frozen=True)
class AuditBound:
    epsilon_lower_bound: float
    guesses: int
    guesses_in: int
    guesses_out: int
    correct_guesses: int
    canaries: int
    delta: float
    confidence: float
    grid: tuple[int, ...]  # guess counts tried (Bonferroni: each at (1 − confidence) / len(grid))

    def to_dict(self) -> dict:
        return {**asdict(self), "grid": list(self.grid)}


def best_bound(scores: np.ndarray, included: np.ndarray, delta: float, confidence: float = CONFIDENCE,
               fractions: tuple[float, ...] = GUESS_FRACTIONS) -> AuditBound:
    """The best bound over the guess grid, each grid point paid for at level (1 − confidence) / |grid|.

    `scores`: higher means "more likely trained on"; `included`: the canaries' true coins."""
    included = np.asarray(included, bool)
    m = len(included)
    if len(scores) != m or m < 2:
        raise ValueError(f"need ≥ 2 canaries and one score each; got {len(scores)} scores for {m} canaries.")
    grid = guess_grid(m, fractions)
    alpha = (1 - confidence) / len(grid)
    best: AuditBound | None = None
    for r in grid:
        k_in, k_out, v = guess_counts(scores, included, r)
        bound = AuditBound(epsilon_lower_bound(m, r, v, delta, alpha), r, k_in, k_out, v, m, delta, confidence, tuple(grid))
        if best is None or bound.epsilon_lower_bound > best.epsilon_lower_bound:
            best = bound
    return best
