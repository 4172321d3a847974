"""LiRA and U-LiRA on synthetic scores: they find a real membership signal, sit at chance without one,
and never let a model be scored by a fit it was part of."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation import lira


def _population(k: int, n: int, shift: float, seed: int = 0):
    """Reference and target φ where training on an example raises its φ by `shift` (per-example baseline)."""
    rng = np.random.default_rng(seed)
    member = lira.paired_halves(k, n, seed + 1)
    base = rng.normal(0, 2, n)  # easy and hard examples: what a global threshold cannot see
    refs = base + shift * member + rng.normal(0, 0.5, (k, n))
    target_in = rng.random(n) < 0.5
    target = base + shift * target_in + rng.normal(0, 0.5, n)
    return target, refs, member, target_in


def test_paired_halves_put_every_example_in_exactly_half_of_an_even_number_of_models():
    member = lira.paired_halves(6, 1000, seed=3)
    assert member.shape == (6, 1000) and (member.sum(axis=0) == 3).all()
    assert (member[0] == ~member[1]).all() and 400 < member[0].sum() < 600
    assert (lira.paired_halves(2, 1000, seed=3) == member[:2]).all()  # model j's half does not depend on k


@pytest.mark.parametrize("online", [False, True])
def test_lira_separates_members_when_training_moves_the_score_and_sits_at_chance_when_not(online):
    target, refs, member, target_in = _population(8, 4000, shift=1.0)
    scores = lira.lira_scores(target, refs, member, online=online)
    found = lira.attack_summary(scores[target_in], scores[~target_in])
    assert found["auc"] > 0.85 and found["tpr_at_1pct_fpr"] > 0.1
    assert found["auc_ci"][0] < found["auc"] < found["auc_ci"][1]
    assert found["tpr_at_1pct_fpr_ci"][0] <= found["tpr_at_1pct_fpr"] <= found["tpr_at_1pct_fpr_ci"][1]
    target, refs, member, target_in = _population(8, 4000, shift=0.0, seed=5)
    scores = lira.lira_scores(target, refs, member, online=online)
    chance = lira.attack_summary(scores[target_in], scores[~target_in])
    assert chance["auc_ci"][0] < 0.5 < chance["auc_ci"][1] and chance["tpr_at_0_1pct_fpr"] < 0.01


def test_per_example_means_beat_the_global_threshold_attack_on_hard_and_easy_examples():
    target, refs, member, target_in = _population(8, 4000, shift=1.0)
    scores = lira.lira_scores(target, refs, member, online=False)
    assert (lira.attack_summary(scores[target_in], scores[~target_in])["auc"]
            > lira.attack_summary(target[target_in], target[~target_in])["auc"] + 0.1)


def test_examples_without_an_out_reference_model_get_no_score():
    target, refs, member, _ = _population(2, 10, shift=1.0)
    member[:, 0] = True  # both reference models trained on example 0
    offline = lira.lira_scores(target, refs, member, online=False)
    assert np.isnan(offline[0]) and not np.isnan(offline[1:]).any()


def test_tpr_at_fpr_counts_only_thresholds_within_the_false_positive_budget():
    members, nonmembers = np.array([10.0, 9.0, 1.0, 0.5]), np.array([9.5, 0.8] + [0.0] * 98)
    assert lira.tpr_at_fpr(members, nonmembers, 0.01)["tpr"] == 0.75  # t = 1: 9.5 is the one false positive
    assert lira.tpr_at_fpr(members, nonmembers, 0.001)["tpr"] == 0.25  # no false positive allowed: only 10


def test_ulira_is_at_chance_for_exchangeable_models_and_finds_models_that_kept_the_forget_set():
    rng = np.random.default_rng(0)
    example = rng.normal(0, 2, 40)  # per forget example difficulty, shared by every model
    retrained = example + rng.normal(0, 0.3, (4, 40))
    same = example + rng.normal(0, 0.3, (4, 40))
    at_chance = lira.ulira(same, retrained, permutations=100)
    assert at_chance["p_value"] > 0.05 and abs(at_chance["balanced_accuracy"] - at_chance["balanced_accuracy_null_mean"]) < 0.1
    kept = lira.ulira(example + 1.5 + rng.normal(0, 0.3, (4, 40)), retrained, permutations=100)
    assert kept["balanced_accuracy"] > 0.9 and kept["p_value"] < 0.05 and kept["tpr_at_1pct_fpr"] > 0.5


def test_ulira_scores_each_model_by_a_fit_without_it():
    rng = np.random.default_rng(1)
    u, r = rng.normal(0, 1, (3, 5)), rng.normal(0, 1, (3, 5))
    su, _ = lira.ulira_scores(u, r)
    u_moved = u.copy()
    u_moved[0] += 100.0  # model 0 alone far away: with leave-one-out its own fit cannot follow it
    su_moved, _ = lira.ulira_scores(u_moved, r)
    assert (su_moved[0] < su[0]).all()  # far from the other unlearned models: looks less "unlearned"
    with pytest.raises(ValueError, match="K ≥ 2"):
        lira.ulira_scores(u[:1], r[:1])
