"""Accuracy of the ensemble (mean softmax and majority vote), of each shard, and its privacy."""
from __future__ import annotations

import numpy as np

from pipeline.data.datasets import Data
from pipeline.driver import Ensemble, aggregate


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float((predictions == labels).mean())


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            ece += inside.mean() * abs(confidence[inside].mean() - (predicted[inside] == labels[inside]).mean())
    return float(ece)


def metrics_from_probs(probs: np.ndarray, labels: np.ndarray) -> dict:
    """(S, N, C) constituent softmax outputs → ensemble and per-shard accuracy."""
    mean, vote = aggregate(probs)
    return {
        "accuracy": accuracy(mean.argmax(axis=1), labels),
        "vote_accuracy": accuracy(vote, labels),
        "shard_accuracy": [accuracy(p.argmax(axis=1), labels) for p in probs],
        "ece": expected_calibration_error(mean, labels),
    }


def ensemble_metrics(ensemble: Ensemble, data: Data) -> dict:
    """Test metrics plus each shard's live ε (and cumulative ε over its releases)."""
    metrics = metrics_from_probs(ensemble.predict_proba(data.test.x), data.test.y)
    status = ensemble.status()
    privacy = ensemble.config.privacy
    metrics.update({
        "epsilon_target": privacy.epsilon,
        "epsilon_spent": [status[s]["epsilon"] for s in sorted(status)],
        "epsilon_cumulative": [status[s]["epsilon_cumulative"] for s in sorted(status)],
        "delta": privacy.delta,
        "model_versions": [status[s]["version"] for s in sorted(status)],
        "test_samples": int(len(data.test.y)),
    })
    return metrics
