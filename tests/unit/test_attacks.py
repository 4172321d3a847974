"""Unit tests for pipeline.evaluation.attacks: exact ROC/AUC with ties, attacks, Clopper-Pearson and the audit bound."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.evaluation.attacks import (
    balanced_sample,
    clopper_pearson,
    epsilon_lower_bound,
    logistic_attack,
    loss_attack,
    per_example_loss,
    posterior_attack,
    run_attacks,
    threshold_attack,
    true_class_confidence,
)


def _synthetic_probs(n: int, classes: int, confident: bool, rng: np.random.Generator):
    """Probs whose true-class mass is high (members) or middling (non-members); rest spread evenly."""
    labels = rng.integers(0, classes, size=n)
    p_true = rng.beta(20, 1, size=n) if confident else rng.beta(2, 2, size=n)
    probs = np.repeat(((1 - p_true) / (classes - 1))[:, None], classes, axis=1)
    probs[np.arange(n), labels] = p_true
    return probs, labels


def test_perfectly_separable_scores_give_perfect_attack():
    res = threshold_attack(np.array([5.0, 6.0, 7.0]), np.array([1.0, 2.0, 3.0]))
    assert res.auc == 1.0
    assert res.advantage == 1.0
    assert res.accuracy == 1.0
    assert res.tpr_at_1pct_fpr == 1.0
    assert res.tpr_at_0_1pct_fpr == 1.0


def test_identical_score_distributions_are_at_chance():
    scores = np.random.default_rng(0).normal(size=200)
    res = threshold_attack(scores, scores.copy())
    assert res.auc == pytest.approx(0.5)
    assert res.advantage == pytest.approx(0.0)
    assert res.accuracy == pytest.approx(0.5)
    lo, hi = res.accuracy_ci
    assert lo < 0.5 < hi


def test_reversed_separable_scores_give_zero_auc():
    res = threshold_attack(np.array([1.0, 2.0, 3.0]), np.array([5.0, 6.0, 7.0]))
    assert res.auc == 0.0
    assert res.advantage == 0.0  # the trivial thresholds always reach TPR - FPR = 0


def test_ties_move_together_in_roc_and_count_half_in_auc():
    members, nonmembers = np.array([3.0, 2.0, 2.0]), np.array([2.0, 1.0, 1.0])
    res = threshold_attack(members, nonmembers)
    # AUC by hand over the 9 pairs: m=3 beats all 3 -> 3; each m=2 ties n=2 (1/2) and beats both 1s -> 2.5.
    # (3 + 2.5 + 2.5) / 9 = 8/9.
    assert res.auc == pytest.approx(8 / 9)
    assert res.auc == pytest.approx(roc_auc_score(np.r_[1, 1, 1, 0, 0, 0], np.r_[members, nonmembers]))
    # ROC points (t>=3: TPR 1/3, FPR 0), (t>=2: 1, 1/3), (t>=1: 1, 1); splitting the tie at 2 would
    # wrongly reach (1, 0). Best TPR - FPR = 2/3, balanced accuracy 5/6, TPR at FPR 0 = 1/3.
    assert res.advantage == pytest.approx(2 / 3)
    assert res.accuracy == pytest.approx(5 / 6)
    assert res.tpr_at_1pct_fpr == pytest.approx(1 / 3)


def test_to_dict_is_json_serialisable_plain_types():
    d = threshold_attack(np.array([1.0, 2.0]), np.array([0.5, 1.5])).to_dict()
    json.dumps(d)
    assert isinstance(d["n_members"], int) and isinstance(d["auc"], float)


def test_confidence_and_loss_are_consistent():
    probs = np.array([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0]])
    labels = np.array([0, 2])
    np.testing.assert_allclose(true_class_confidence(probs, labels), [0.7, 0.0])
    np.testing.assert_allclose(per_example_loss(probs, labels), [-np.log(0.7), -np.log(1e-12)])


def test_posterior_and_loss_attacks_detect_confident_members():
    rng = np.random.default_rng(1)
    mp, ml = _synthetic_probs(300, 10, True, rng)
    np_, nl = _synthetic_probs(300, 10, False, rng)
    post = posterior_attack(mp, ml, np_, nl)
    loss = loss_attack(mp, ml, np_, nl)
    assert post.auc > 0.9
    assert loss.auc == pytest.approx(post.auc)  # -loss is monotone in confidence
    assert post.accuracy_ci[0] > 0.5  # clearly better than chance


def test_logistic_attack_is_deterministic_for_a_seed_and_learns():
    rng = np.random.default_rng(2)
    mp, ml = _synthetic_probs(200, 5, True, rng)
    np_, nl = _synthetic_probs(200, 5, False, rng)
    a = logistic_attack(mp, ml, np_, nl, seed=3)
    b = logistic_attack(mp, ml, np_, nl, seed=3)
    assert a == b
    assert a.auc > 0.85


def test_run_attacks_returns_all_three_keys():
    rng = np.random.default_rng(3)
    mp, ml = _synthetic_probs(60, 4, True, rng)
    np_, nl = _synthetic_probs(60, 4, False, rng)
    out = run_attacks(mp, ml, np_, nl, seed=0)
    assert set(out) == {"posterior", "loss", "logistic"}


def test_balanced_sample_is_deterministic_equal_sized_subsets():
    members, nonmembers = np.arange(100), np.arange(1000, 1040)
    m1, n1 = balanced_sample(members, nonmembers, None, seed=7)
    m2, n2 = balanced_sample(members, nonmembers, None, seed=7)
    assert len(m1) == len(n1) == 40
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_array_equal(n1, n2)
    assert set(m1) <= set(members) and len(set(m1)) == 40
    m3, n3 = balanced_sample(members, nonmembers, 10, seed=7)
    assert len(m3) == len(n3) == 10
    with pytest.raises(ValueError):
        balanced_sample(members, nonmembers, 41, seed=0)


def test_clopper_pearson_matches_known_values_and_contains_rate():
    lo, hi = clopper_pearson(0, 10)
    assert lo == 0.0
    assert hi == pytest.approx(0.3085, abs=1e-4)  # 1 - 0.025**(1/10)
    lo, hi = clopper_pearson(10, 10)
    assert lo == pytest.approx(0.025 ** (1 / 10)) and hi == 1.0
    ks = np.arange(0, 21)
    los, his = clopper_pearson(ks, 20)
    assert np.all(los <= ks / 20) and np.all(ks / 20 <= his)
    assert (los[7], his[7]) == pytest.approx(clopper_pearson(7, 20))


def test_epsilon_lower_bound_is_zero_for_identical_distributions():
    scores = np.random.default_rng(4).normal(size=300)
    assert epsilon_lower_bound(scores, scores.copy(), delta=1e-5) == 0.0


def test_epsilon_lower_bound_is_large_for_perfect_separation():
    members, nonmembers = np.arange(1000, 2000.0), np.arange(0, 1000.0)
    assert epsilon_lower_bound(members, nonmembers, delta=1e-5) > 2.0


def test_epsilon_lower_bound_is_never_negative():
    rng = np.random.default_rng(5)
    for shift in (-3.0, -0.5, 0.0, 0.5):
        assert epsilon_lower_bound(rng.normal(shift, size=50), rng.normal(size=70), delta=1e-5) >= 0.0


def test_epsilon_lower_bound_grows_with_more_separated_samples():
    bounds = [epsilon_lower_bound(np.arange(n, 2.0 * n), np.arange(0.0, n), delta=1e-5) for n in (20, 100, 1000)]
    assert bounds[0] < bounds[1] < bounds[2]


def test_epsilon_lower_bound_rarely_exceeds_true_epsilon_of_randomized_response():
    # Randomized response with eps=1 is (1, 0)-DP; the audit must exceed 1 at most 5% of the time.
    rng = np.random.default_rng(6)
    p = np.e / (1 + np.e)
    bounds = np.array([
        epsilon_lower_bound(rng.random(500) < p, rng.random(500) < 1 - p, delta=0.0) for _ in range(200)
    ])
    assert np.mean(bounds > 1.0) <= 0.05
    assert np.median(bounds) > 0.3  # and it is not vacuous


def test_run_attacks_with_one_member_skips_the_cross_validated_attack_instead_of_failing():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=5)
    out = run_attacks(probs[:1], np.array([0]), probs[1:], np.array([0, 1, 2, 1]), seed=0)
    assert set(out) == {"posterior", "loss"} and 0 <= out["loss"].auc <= 1
