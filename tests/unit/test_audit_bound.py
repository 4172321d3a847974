"""The one-run audit's ε lower bound (pure math), its canaries in the data layer, and its input errors."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit
from scipy.stats import binom

from pipeline.config import DataConfig
from pipeline.data import canaries, datasets
from pipeline.evaluation import audit_bound
from pipeline.evaluation.audit_bound import best_bound, epsilon_lower_bound, guess_counts, p_value
from pipeline.verbs import audit

ALPHA = 0.05


def _published_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The paper's p-value routine written out as a plain loop, to cross-check the vectorised one."""
    q = 1 / (1 + np.exp(-eps))
    beta = binom.sf(v - 1, r, q)
    slope, running = 0.0, 0.0
    for i in range(1, v + 1):
        running += binom.pmf(v - i, r, q)
        slope = max(slope, running / i)
    return min(1.0, beta + slope * delta * 2 * m)


def test_no_correct_guesses_and_chance_level_guessing_give_zero():
    assert epsilon_lower_bound(200, 100, 0, 1e-5) == 0.0
    assert epsilon_lower_bound(200, 100, 50, 1e-5) == 0.0
    assert epsilon_lower_bound(200, 0, 0, 1e-5) == 0.0


def test_many_correct_guesses_give_a_clearly_positive_bound():
    assert epsilon_lower_bound(200, 200, 200, 1e-5) > 3.5  # ≈ 4.19
    assert epsilon_lower_bound(1000, 1000, 1000, 0.0) > 5


def test_delta_zero_bound_is_where_the_binomial_tail_reaches_alpha():
    m, r, v = 300, 120, 100
    eps = epsilon_lower_bound(m, r, v, 0.0, ALPHA)
    assert eps > 0
    assert binom.sf(v - 1, r, expit(eps)) == pytest.approx(ALPHA, rel=1e-6)  # direct scipy computation
    assert binom.sf(v - 1, r, expit(eps + 1e-3)) > ALPHA


@pytest.mark.parametrize("m,r,v,eps,delta", [(200, 100, 90, 2.0, 1e-5), (1000, 600, 600, 5.0, 1e-5), (50, 40, 30, 0.3, 1e-3)])
def test_p_value_matches_the_papers_routine(m, r, v, eps, delta):
    assert p_value(m, r, v, eps, delta) == pytest.approx(_published_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


def test_delta_makes_the_bound_smaller():
    assert epsilon_lower_bound(200, 100, 95, 1e-3) < epsilon_lower_bound(200, 100, 95, 1e-5) < epsilon_lower_bound(200, 100, 95, 0.0)


def test_bound_is_monotone_in_correct_guesses_and_capped_by_perfect_guessing():
    m, r = 200, 80
    bounds = [epsilon_lower_bound(m, r, v, 1e-5) for v in range(r + 1)]
    assert all(a <= b + 1e-9 for a, b in zip(bounds, bounds[1:]))
    assert max(bounds) == bounds[-1] > 0


def test_bonferroni_over_the_guess_grid_lowers_the_bound():
    assert epsilon_lower_bound(200, 100, 95, 1e-5, ALPHA / 6) < epsilon_lower_bound(200, 100, 95, 1e-5, ALPHA)
    rng = np.random.default_rng(0)
    included = rng.random(200) < 0.5
    scores = included + rng.normal(0, 0.4, 200)  # a decent attack
    grid = best_bound(scores, included, 1e-5)
    single = best_bound(scores, included, 1e-5, fractions=(grid.guesses / 200,))
    assert len(grid.grid) == len(audit_bound.GUESS_FRACTIONS) and single.grid == (grid.guesses,)
    assert single.correct_guesses == grid.correct_guesses
    assert 0 < grid.epsilon_lower_bound < single.epsilon_lower_bound


def test_best_bound_never_exceeds_perfect_guessing_and_reaches_it_with_a_perfect_attack():
    rng = np.random.default_rng(1)
    m, delta = 200, 1e-5
    included = rng.random(m) < 0.5
    alpha = (1 - audit_bound.CONFIDENCE) / len(audit_bound.guess_grid(m))
    perfect = max(epsilon_lower_bound(m, r, r, delta, alpha) for r in audit_bound.guess_grid(m)
                  if r <= 2 * min(included.sum(), (~included).sum()))
    for scores in (rng.normal(size=m), included + rng.normal(0, 0.3, m), included.astype(float)):
        assert best_bound(scores, included, delta).epsilon_lower_bound <= perfect + 1e-9
    assert best_bound(included.astype(float), included, delta).epsilon_lower_bound == pytest.approx(perfect)
    assert best_bound(rng.normal(size=m), included, delta).epsilon_lower_bound < 1.0  # a random attack: (near) nothing


def test_guesses_take_the_highest_scores_in_and_the_lowest_out():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([True, False, True, False, False, True])
    assert guess_counts(scores, included, 4) == (2, 2, 2)  # in: ids 0 ✓, 1 ✗; out: ids 4 ✓, 5 ✗
    assert guess_counts(scores, included, 3) == (2, 1, 1)


# -- canaries in the data layer ---------------------------------------------------------------
def test_canaries_come_from_the_test_tail_with_wrong_labels_and_extend_the_private_ids():
    plain = datasets.load(DataConfig(name="digits", public_size=400))
    data = datasets.load(DataConfig(name="digits", public_size=400, canaries=150, canary_seed=3))
    pool, n = data.canaries, len(plain.private.y)
    assert pool.count == 150 and len(data.test.y) == len(plain.test.y) - 150
    np.testing.assert_array_equal(data.test.ids, plain.test.ids[:-150])
    np.testing.assert_array_equal(pool.test_ids, plain.test.ids[-150:])
    assert (pool.label != pool.true_label).all() and (pool.true_label == plain.test.y[-150:]).all()
    k = int(pool.included.sum())
    assert 50 < k < 100  # fair coins
    np.testing.assert_array_equal(data.private.ids, np.arange(n + k))
    np.testing.assert_array_equal(pool.private_ids[pool.included], np.arange(n, n + k))
    assert (pool.private_ids[~pool.included] == -1).all()
    np.testing.assert_array_equal(data.private.x[n:], pool.x[pool.included])
    np.testing.assert_array_equal(data.private.y[n:], pool.label[pool.included])
    again = datasets.load(DataConfig(name="digits", public_size=400, canaries=150, canary_seed=3))
    np.testing.assert_array_equal(again.canaries.included, pool.included)  # every verb sees the same data
    other = datasets.load(DataConfig(name="digits", public_size=400, canaries=150, canary_seed=4))
    assert not np.array_equal(other.canaries.included, pool.included)


@pytest.mark.parametrize("count,fix", [(1, "at least 2"), (0, "at least 2"), (10_000, "at most 259")])
def test_audit_rejects_too_few_or_too_many_canaries_before_training(digits_config, count, fix):
    with pytest.raises(audit.AuditError, match=fix) as info:
        audit.run_audit(digits_config(), count)
    assert "\n" not in str(info.value)


def test_too_many_canaries_in_a_config_is_a_data_error():
    with pytest.raises(datasets.DataError, match=r"data.canaries=300: .*at most 259"):
        datasets.load(DataConfig(name="digits", public_size=400, canaries=300))
    assert canaries.capacity(359) == 259
