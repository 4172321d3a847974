"""The comparison's one yardstick: every method's predictions judged the same way against its oracle.

Pure numpy over predictions made in the method tasks: forget / retain / test accuracy, MIA on the
forget set vs test non-members (same class for class forgetting), KL to the oracle's outputs on
the test and forget sets, parameter L2 to the oracle (per ensemble member), and the NeurIPS-2023
score of K method runs against K oracle runs (`unlearning.unlearning_score`, `SCORE_DEFINITION`) next to
its permutation baseline (`unlearning.score_permutation_null`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.evaluation import attacks, lira
from pipeline.evaluation.unlearning import (
    accuracy,
    logit_confidence_from_logits,
    mean_kl_divergence,
    parameter_l2_distance,
    score_permutation_null,
    unlearning_score,
)

SPLITS = ("forget", "retain", "test")


@dataclass(frozen=True)
class Labels:
    """Labels of the evaluation splits, and which test rows are the forget set's non-members."""

    forget: np.ndarray
    retain: np.ndarray
    test: np.ndarray
    nonmember_rows: np.ndarray  # rows of the test split used as MIA non-members


@dataclass(frozen=True)
class Run:
    """One (method or oracle, seed) result: mean-softmax predictions per split, member parameters, and the
    members' forget-set logits (S, |F|, C) in float64, from which the score's φ is computed."""

    probs: dict[str, np.ndarray]
    params: list[dict[str, np.ndarray]]
    seconds: float
    forget_logits: np.ndarray

    def forget_phi(self, labels: np.ndarray) -> np.ndarray:
        """φ per forget example of the (mean-softmax) ensemble, from logits: no float32 saturation."""
        return logit_confidence_from_logits(self.forget_logits, labels)


def mia(probs: dict[str, np.ndarray], labels: Labels) -> dict[str, float]:
    """Loss attack (Yeom et al.): the whole forget set (members) vs every non-member test row. AUC and
    TPR at low FPR need no balanced draw, and a 1% forget set is small: using every non-member keeps
    the AUC from being a coin flip on 20 vs 20."""
    rows = labels.nonmember_rows
    result = attacks.loss_attack(probs["forget"], labels.forget, probs["test"][rows], labels.test[rows])
    return {"mia_auc": result.auc, "mia_auc_ci": attacks.auc_interval(result.auc, len(labels.forget), len(rows)),
            "mia_advantage": result.advantage, "mia_tpr_at_1pct_fpr": result.tpr_at_1pct_fpr}


def accuracies(probs: dict[str, np.ndarray], labels: Labels) -> dict[str, float]:
    return {f"{s}_accuracy": accuracy(probs[s], getattr(labels, s)) for s in SPLITS}


def l2_per_member(run: Run, oracle: Run) -> list[float]:
    return [parameter_l2_distance(a, b) for a, b in zip(run.params, oracle.params)]


def compare(runs: list[Run], oracles: list[Run], labels: Labels, seed: int, permutations: int = 100) -> dict:
    """Row metrics: means over the K (run, oracle) pairs of the same seed, plus the K-vs-K score."""
    per_seed = []
    for run, oracle in zip(runs, oracles):
        l2 = l2_per_member(run, oracle)
        per_seed.append({**accuracies(run.probs, labels), **mia(run.probs, labels),
                         "kl_to_oracle": mean_kl_divergence(run.probs["test"], oracle.probs["test"]),
                         "kl_to_oracle_forget": mean_kl_divergence(run.probs["forget"], oracle.probs["forget"]),
                         "l2_to_oracle": float(np.mean(l2)), "seconds": run.seconds, "oracle_seconds": oracle.seconds,
                         "l2_to_oracle_per_shard": l2})
    # scalars and lists (CI bounds, per-shard L2) are averaged element-wise over the K seeds
    row = {key: (np.mean([p[key] for p in per_seed], axis=0).tolist() if isinstance(per_seed[0][key], list)
                 else float(np.mean([p[key] for p in per_seed]))) for key in per_seed[0]}
    row["speedup"] = None if row["seconds"] < 1e-4 else row["oracle_seconds"] / row["seconds"]  # None: no work at all
    row.update(score(runs, oracles, labels, permutations, seed))
    return row


SCORE_DEFINITION = (
    "NeurIPS-2023 machine-unlearning challenge score: per forget example, every interval attack (\"unlearned iff "
    "a <= φ <= b\", and its complement; single thresholds included) on φ, the logit-scaled true-class confidence of "
    "K method runs vs K oracle runs, gives FPR and FNR, each clipped to at least 1/(2K); ε = max log((1 − δ − FPR) / "
    "FNR), log((1 − δ − FNR) / FPR) (δ = 1e-5); bucket credit 2^−⌊ε/0.5⌋; F = mean credit over the forget set; "
    "score = F × (retain accuracy ratio) × (test accuracy ratio), runs over oracles. Permutation baseline: the "
    "score of random relabellings of the 2K models (mean, 2.5% and 97.5% quantiles, p = share ≤ observed)")
# Old row keys → their new names, kept in every row for one release, then removed (same numbers; `score_at_chance`
# and `score_p_value` were F's permutation baseline, not the score's).
DEPRECATED_KEYS = {"score": "neurips2023_score", "forgetting_quality": "neurips2023_forgetting_quality",
                   "score_at_chance": "neurips2023_forgetting_quality_null_mean",
                   "score_p_value": "neurips2023_forgetting_quality_p_value"}


def score(runs: list[Run], oracles: list[Run], labels: Labels, permutations: int, seed: int) -> dict:
    """NeurIPS-2023 score of K runs vs K oracles (forget-set φ from logits), with its permutation baseline
    (`SCORE_DEFINITION`), and U-LiRA on the same φ."""
    u = np.stack([r.forget_phi(labels.forget) for r in runs])
    o = np.stack([r.forget_phi(labels.forget) for r in oracles])
    acc = {g: {s: np.array([accuracy(r.probs[s], getattr(labels, s)) for r in group]) for s in ("retain", "test")}
           for g, group in (("u", runs), ("o", oracles))}
    result = unlearning_score(u, o, acc["u"]["retain"].mean(), acc["o"]["retain"].mean(), acc["u"]["test"].mean(),
                              acc["o"]["test"].mean())
    out = {"neurips2023_score": result["score"], "neurips2023_forgetting_quality": result["forgetting_quality"]}
    if permutations and len(runs) > 1:
        null = score_permutation_null(u, o, acc["u"]["retain"], acc["o"]["retain"], acc["u"]["test"], acc["o"]["test"],
                                      permutations=permutations, seed=seed)
        out.update({f"neurips2023_score_{k}": null[k] for k in ("null_mean", "null_p025", "null_p975", "p_value")},
                   neurips2023_forgetting_quality_null_mean=null["forgetting_quality_null_mean"],
                   neurips2023_forgetting_quality_p_value=null["forgetting_quality_p_value"])
    out.update({old: out[new] for old, new in DEPRECATED_KEYS.items() if new in out})
    if len(runs) > 1:  # U-LiRA (leave-one-out) needs two models per group
        found = lira.ulira(u, o, permutations=permutations, seed=seed)
        out.update(ulira_tpr_at_1pct_fpr=found["tpr_at_1pct_fpr"], ulira_tpr_at_0_1pct_fpr=found["tpr_at_0_1pct_fpr"],
                   ulira_balanced_accuracy=found["balanced_accuracy"],
                   ulira_at_chance=found.get("balanced_accuracy_null_mean"), ulira_p_value=found.get("p_value"))
    return out


def original_gap(probs: dict[str, np.ndarray], labels: Labels, seed: int) -> dict[str, float]:
    """How much the original remembers: forget-set minus test accuracy (points), its MIA on the forget set, and
    the same attack on the retain sample (many more members: whether the model memorises at all)."""
    acc = accuracies(probs, labels)
    rows = labels.nonmember_rows
    members = attacks.loss_attack(probs["retain"], labels.retain, probs["test"][rows], labels.test[rows]).auc
    return {**acc, "gap_points": 100 * (acc["forget_accuracy"] - acc["test_accuracy"]), **mia(probs, labels),
            "mia_auc_retain": members, "mia_auc_retain_ci": attacks.auc_interval(members, len(labels.retain), len(rows))}
