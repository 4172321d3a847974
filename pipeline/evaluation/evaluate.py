"""Accuracy of the ensemble (mean softmax and majority vote), of each shard, and its privacy."""
from __future__ import annotations

import numpy as np

from pipeline.config import Config
from pipeline.core.models import Classifier
from pipeline.core.pretrain import source_predictions
from pipeline.data.datasets import Data
from pipeline.evaluation import attacks, unlearning
from pipeline.sisa.driver import Ensemble, aggregate

MIA_SAMPLES = 2000  # members and non-members each (balanced)


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
    correct = int((mean.argmax(axis=1) == labels).sum())
    return {
        "accuracy": accuracy(mean.argmax(axis=1), labels),
        "accuracy_ci": list(attacks.clopper_pearson(correct, len(labels))),  # 95%, exact binomial over the test set
        "vote_accuracy": accuracy(vote, labels),
        "shard_accuracy": [accuracy(p.argmax(axis=1), labels) for p in probs],
        "ece": expected_calibration_error(mean, labels),
    }


def public_accuracy(source: Classifier, classes: list[int], config: Config, data: Data) -> float | None:
    """Accuracy on the target test set of the public model with its own source head (classes
    outside the source task count as wrong): what the ensemble's `accuracy` is to beat, i.e. what
    the private data bought. None when the public data is another data set (its labels mean other classes)."""
    if config.data.public != "heldout":
        return None
    return accuracy(source_predictions(source, classes, data.test.x), data.test.y)


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


def membership_inference(ensemble: Ensemble, data: Data, forgotten: set[int], seed: int = 0,
                         samples: int = MIA_SAMPLES, probe_ids: list[int] | None = None) -> dict:
    """Posterior, loss and logistic attacks on the mean-softmax ensemble: live training members
    vs test non-members (balanced), and forgotten ids vs non-members (should be at chance).
    Members are the ids the live version trained on: the ledger's assignments less the forgotten
    ids (a `data.keep_half` run never trained on the other half of the pool, a run trained with
    `exclude_ids` never on those). `probe_ids` replaces the forgotten ids in the last attack —
    ids about to be forgotten give the "before" measurement. The posterior attack's
    Clopper–Pearson ε lower bound audits ε."""
    forgotten_arr = np.fromiter(sorted(forgotten), np.int64, len(forgotten))
    live = np.setdiff1d(ensemble.ledger.assignments()["sample_id"].to_numpy(), forgotten_arr)
    members, nonmembers = attacks.balanced_sample(live, data.test.ids, min(samples, len(live), len(data.test.ids)), seed)
    member_probs, nonmember_probs = ensemble.predict_mean(data.private.x[members]), ensemble.predict_mean(data.test.x[nonmembers])
    member_y, nonmember_y = data.private.y[members], data.test.y[nonmembers]
    results = attacks.run_attacks(member_probs, member_y, nonmember_probs, nonmember_y, seed)
    delta = ensemble.config.privacy.delta
    out = {
        "mia": {name: r.to_dict() for name, r in results.items()},
        "epsilon_lower_bound": attacks.epsilon_lower_bound(
            attacks.true_class_confidence(member_probs, member_y),
            attacks.true_class_confidence(nonmember_probs, nonmember_y), delta),
    }
    probe = forgotten_arr if probe_ids is None else np.asarray(sorted(probe_ids), np.int64)
    if len(probe):
        gone, others = attacks.balanced_sample(probe, data.test.ids, None, seed + 1)
        gone_probs, other_probs = ensemble.predict_mean(data.private.x[gone]), ensemble.predict_mean(data.test.x[others])
        forgotten_results = attacks.run_attacks(gone_probs, data.private.y[gone], other_probs, data.test.y[others], seed)
        out["mia_forgotten"] = {name: r.to_dict() for name, r in forgotten_results.items()}
    return out


def unlearning_report(ensemble: Ensemble, data: Data, forgotten: set[int], oracle_probs: dict[int, np.ndarray],
                      seed: int = 0, samples: int = MIA_SAMPLES) -> dict:
    """The unlearning yardstick against the retrained oracle (exactly 0 distances for SISA when
    verify passes; the same numbers judge approximate methods): forget / retain / test accuracy
    of the live ensemble and KL(live ‖ oracle) of the ensembles' test outputs."""
    live = ensemble.predict_proba(data.test.x)  # (S, N, C)
    oracle = np.stack([oracle_probs.get(s, live[s]) for s in range(len(live))]).mean(axis=0)  # untouched: own oracle
    live = live.mean(axis=0)
    forgotten_ids = np.asarray(sorted(forgotten), np.int64)
    retained = np.setdiff1d(data.private.ids, forgotten_ids)
    retained = np.random.default_rng(seed).choice(retained, min(samples, len(retained)), replace=False)

    def ensemble_accuracy(ids: np.ndarray) -> float | None:
        if not len(ids):
            return None
        return unlearning.accuracy(ensemble.predict_mean(data.private.x[ids]), data.private.y[ids])

    return {
        "forget_accuracy": ensemble_accuracy(forgotten_ids),
        "retain_accuracy": ensemble_accuracy(retained),
        "test_accuracy": unlearning.accuracy(live, data.test.y),
        "oracle_test_accuracy": unlearning.accuracy(oracle, data.test.y),
        "kl_to_oracle": unlearning.mean_kl_divergence(live, oracle),
        "forgotten": int(len(forgotten_ids)),
    }
