"""Unit tests for pipeline.evaluation.unlearning: distances and the NeurIPS-2023 unlearning score."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from pipeline.core.train import predict_logits, predict_proba
from pipeline.evaluation.unlearning import (
    accuracy,
    bucket_score,
    logit_confidence_from_logits,
    logit_scaled_confidence,
    mean_kl_divergence,
    parameter_l2_distance,
    per_example_epsilon,
    unlearning_score,
)


def test_accuracy_counts_argmax_hits():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert accuracy(probs, np.array([0, 1, 1])) == pytest.approx(2 / 3)


def test_kl_is_exactly_zero_for_identical_inputs():
    probs = np.random.default_rng(0).dirichlet(np.ones(10), size=50)
    probs[0, :] = 0.0
    probs[0, 3] = 1.0  # a one-hot row exercises clipping
    assert mean_kl_divergence(probs, probs.copy()) == 0.0


def test_kl_is_positive_and_matches_hand_value():
    p = np.array([[0.5, 0.5]])
    q = np.array([[0.9, 0.1]])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert mean_kl_divergence(p, q) == pytest.approx(expected)
    assert expected > 0


def test_parameter_l2_distance_zero_and_hand_value():
    a = {"w": np.array([[1.0, 2.0]]), "b": np.array([0.0])}
    b = {"w": np.array([[1.0, 0.0]]), "b": np.array([3.0])}
    assert parameter_l2_distance(a, {k: v.copy() for k, v in a.items()}) == 0.0
    assert parameter_l2_distance(a, b) == pytest.approx(math.sqrt(2.0**2 + 3.0**2))


def test_parameter_l2_distance_rejects_mismatched_keys_and_shapes():
    a = {"w": np.zeros(3), "b": np.zeros(1)}
    with pytest.raises(ValueError, match="b"):
        parameter_l2_distance(a, {"w": np.zeros(3)})
    with pytest.raises(ValueError, match="'w'"):
        parameter_l2_distance(a, {"w": np.zeros(4), "b": np.zeros(1)})


def test_logit_scaled_confidence_is_log_odds_of_true_class():
    probs = np.array([[0.8, 0.2], [0.0, 1.0]])
    out = logit_scaled_confidence(probs, np.array([0, 1]))
    assert out[0] == pytest.approx(math.log(4.0))
    assert np.isfinite(out[1]) and out[1] > 20  # clipped, not inf


def test_per_example_epsilon_small_for_identical_score_sets():
    scores = np.random.default_rng(1).normal(size=10)
    eps = per_example_epsilon(scores, scores.copy())
    assert eps < 0.5
    assert bucket_score(eps) == 1.0


def test_per_example_epsilon_large_for_separated_scores_with_rate_clip():
    eps = per_example_epsilon(np.arange(10.0, 20.0), np.arange(0.0, 10.0), delta=1e-5)
    assert eps >= 1.0
    # Zero rates are clipped to 1/(2K) = 0.05, so eps = log((1 - delta - 0.05) / 0.05).
    assert eps == pytest.approx(math.log((1 - 1e-5 - 0.05) / 0.05))


def test_per_example_epsilon_uses_double_threshold_attacks():
    # Unlearned scores sit between two retrained clusters: no single threshold separates them.
    unlearned = np.linspace(-0.1, 0.1, 10)
    retrained = np.r_[np.full(5, -5.0), np.full(5, 5.0)]
    assert per_example_epsilon(unlearned, retrained) == pytest.approx(math.log((1 - 1e-5 - 0.05) / 0.05))


@pytest.mark.parametrize(("eps", "expected"), [(0.0, 1.0), (0.49, 1.0), (0.5, 0.5), (1.2, 0.25), (math.inf, 0.0)])
def test_bucket_score_halves_every_half_epsilon(eps, expected):
    assert bucket_score(eps) == expected


def test_unlearning_score_identical_models_gives_full_forgetting_quality():
    scores = np.random.default_rng(2).normal(size=(10, 6))
    out = unlearning_score(scores, scores.copy(), 0.9, 0.95, 0.8, 0.85)
    assert out["forgetting_quality"] == 1.0
    assert out["score"] == pytest.approx((0.9 / 0.95) * (0.8 / 0.85))
    assert len(out["epsilons"]) == 6


def test_unlearning_score_penalises_distinguishable_models():
    rng = np.random.default_rng(3)
    unlearned = rng.normal(5.0, 0.1, size=(10, 4))
    retrained = rng.normal(0.0, 0.1, size=(10, 4))
    out = unlearning_score(unlearned, retrained, 1.0, 1.0, 1.0, 1.0)
    assert out["forgetting_quality"] < 0.25


def test_permutation_null_calls_exchangeable_groups_chance_and_separated_groups_distinguishable():
    from pipeline.evaluation.unlearning import forgetting_quality, permutation_null

    rng = np.random.default_rng(0)
    same_u, same_r = rng.normal(size=(6, 40)), rng.normal(size=(6, 40))
    null = permutation_null(same_u, same_r, permutations=300, seed=1)
    observed, _ = forgetting_quality(same_u, same_r)
    assert 0.1 < null["p_value"] <= 1.0  # retraining in distribution: not distinguishable
    assert abs(observed - null["null_mean"]) < 0.1 and null["null_mean"] < 0.6  # small K pulls F far below 1
    far = permutation_null(same_u + 5.0, same_r, permutations=300, seed=1)  # remembered: every example separated
    assert far["p_value"] == pytest.approx(1 / 301) and far["null_p05"] > forgetting_quality(same_u + 5.0, same_r)[0]
    assert permutation_null(same_u, same_r, permutations=300, seed=1) == null  # seeded


def _linear_with_logits(rows: list[list[float]]) -> tuple[torch.nn.Module, torch.Tensor]:
    """A real torch model whose logits on inputs e_0..e_{N-1} are the given rows (bias 0)."""
    logits = torch.tensor(rows, dtype=torch.float32)
    model = torch.nn.Linear(len(rows), logits.shape[1], bias=False)
    with torch.no_grad():
        model.weight.copy_(logits.T)
    return model, torch.eye(len(rows))


def test_phi_from_float32_probabilities_saturates_on_confident_examples_but_phi_from_logits_does_not():
    # margins 20 and 40 between the true class and the others: both memorised, one far more than the other
    model, x = _linear_with_logits([[20.0, 0.0, 0.0], [40.0, 0.0, 0.0]])
    labels = np.array([0, 0])
    old = logit_scaled_confidence(predict_proba(model, x).numpy(), labels)
    new = logit_confidence_from_logits(predict_logits(model, x).numpy(), labels)
    assert predict_logits(model, x).dtype == torch.float64
    # p rounds to 1 in float32 (φ ≈ 16.6 at the last float below 1, the 1e-12 clip beyond): a ceiling, not the model
    assert old[0] == old[1] and old[1] < 28
    expected = np.array([20.0, 40.0]) - np.log(2.0)  # z_y − logsumexp(0, 0)
    assert new == pytest.approx(expected, rel=1e-12)


def test_phi_from_logits_equals_the_log_odds_of_the_mean_softmax_for_an_ensemble():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(3, 50, 10))  # 3 members, moderate logits: the float64 probability path is exact
    labels = rng.integers(0, 10, 50)
    mean = np.mean(np.exp(logits - logsumexp(logits, axis=2, keepdims=True)), axis=0)
    assert logit_confidence_from_logits(logits, labels) == pytest.approx(logit_scaled_confidence(mean, labels), rel=1e-9)
    single = logits[0]
    rows = np.arange(50)
    others = np.where(np.eye(10, dtype=bool)[labels], -np.inf, single)
    assert logit_confidence_from_logits(single, labels) == pytest.approx(single[rows, labels] - logsumexp(others, axis=1))
    with pytest.raises(ValueError):
        logit_confidence_from_logits(logits[:, :, :1], labels)


def test_score_null_band_holds_an_independent_retraining_but_not_a_model_group_compared_with_itself():
    from pipeline.evaluation.unlearning import permutation_null, score_permutation_null

    rng = np.random.default_rng(3)
    k, n = 8, 10
    u, r = rng.normal(size=(k, n)), rng.normal(size=(k, n))  # two independent draws of "retraining"
    acc = lambda: rng.uniform(0.95, 0.97, k)  # noqa: E731
    ru, rr, tu, tr = acc(), acc(), acc(), acc()
    observed = unlearning_score(u, r, ru.mean(), rr.mean(), tu.mean(), tr.mean())["score"]
    null = score_permutation_null(u, r, ru, rr, tu, tr, permutations=300, seed=1)
    assert null["null_p025"] <= observed <= null["null_p975"] and null["p_value"] > 0.025
    f_null = permutation_null(u, r, permutations=300, seed=1)  # same relabellings: F's baseline is unchanged
    assert null["forgetting_quality_null_mean"] == f_null["null_mean"] and null["forgetting_quality_p_value"] == f_null["p_value"]
    # the old baselines' exact rows: each run scored against itself (the same K models on both sides)
    itself = unlearning_score(u, u, ru.mean(), ru.mean(), tu.mean(), tu.mean())["score"]
    self_null = score_permutation_null(u, u, ru, ru, tu, tu, permutations=300, seed=1)
    assert itself == 1.0 and itself > self_null["null_p975"]
