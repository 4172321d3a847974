"""The ensemble's test metrics carry the test set's sampling noise: an exact 95% interval on accuracy."""
from __future__ import annotations

import numpy as np

from pipeline.evaluation.evaluate import metrics_from_probs


def test_test_accuracy_comes_with_an_exact_binomial_interval_that_narrows_with_the_test_set():
    rng = np.random.default_rng(0)
    for n, width in ((200, 0.15), (5000, 0.03)):
        labels = rng.integers(0, 10, n)
        probs = np.full((2, n, 10), 0.05)
        right = rng.random(n) < 0.6  # the ensemble is right on ~60% of the test set
        probs[:, np.arange(n), np.where(right, labels, (labels + 1) % 10)] = 0.55
        m = metrics_from_probs(probs, labels)
        low, high = m["accuracy_ci"]
        assert low < m["accuracy"] < high and high - low < width
        assert abs(m["accuracy"] - right.mean()) < 1e-12
