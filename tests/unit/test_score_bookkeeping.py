"""The score's bookkeeping on synthetic ensemble outputs (no training): groups → K × |F| scores → score."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.verbs import scoring


def group(forget_conf: list[list[float]], retain_acc_ok: bool = True) -> dict:
    """K one-member ensembles' logits (1, N, 2) on 3 forget, 2 retain and 2 test examples (label 0), given as the
    probabilities they put on class 0 (logits log p: their softmax is p)."""
    def logits(*p0: float) -> np.ndarray:
        return np.log(np.array([[p, 1.0 - p] for p in p0]))[None]

    return {"forget": [logits(*row) for row in forget_conf],
            "retain": [logits(0.9, 0.9 if retain_acc_ok else 0.1) for _ in forget_conf],
            "test": [logits(0.8, 0.3) for _ in forget_conf]}


LABELS = {"forget": np.zeros(3, int), "retain": np.zeros(2, int), "test": np.zeros(2, int)}


def test_indistinguishable_groups_score_one():
    same = [[0.6, 0.7, 0.8], [0.61, 0.71, 0.81], [0.62, 0.72, 0.82]]
    unlearned, retrained = scoring._group_summary(group(same), LABELS), scoring._group_summary(group(same), LABELS)
    result = scoring._score(unlearned, retrained, delta=1e-5)
    assert unlearned["forget_scores"].shape == (3, 3)
    assert result.forgetting_quality == 1.0 and result.score == 1.0 and result.epsilon_max < 0.5
    assert result.test_accuracy == 0.5 and result.retain_accuracy == 1.0


def test_remembered_forget_set_and_lost_accuracy_lower_the_score():
    remembered = scoring._group_summary(group([[0.99, 0.99, 0.99]] * 3, retain_acc_ok=False), LABELS)
    retrained = scoring._group_summary(group([[0.5, 0.55, 0.6], [0.52, 0.57, 0.62], [0.51, 0.56, 0.61]]), LABELS)
    result = scoring._score(remembered, retrained, delta=1e-5)
    # 3 vs 3 fully separated: ε = log((1 - δ - 1/6) / (1/6)) ≈ 1.61 → bucket 2**-3 on every example
    assert result.epsilon_max == pytest.approx(np.log((1 - 1e-5 - 1 / 6) / (1 / 6)))
    assert result.forgetting_quality == 0.125
    assert result.score == pytest.approx(0.125 * 0.5)  # retain accuracy halved, test accuracy equal
