"""Per-example likelihood-ratio attacks: LiRA (Carlini et al. 2022) and U-LiRA (Hayes et al. 2024).

Pure numpy/scipy. Every model is summarised per example by φ = log(p / (1 − p)) of the probability
p its (mean-softmax ensemble) output gives the example's label, computed from the members' logits in
float64 (`unlearning.logit_confidence_from_logits`): from float32 probabilities φ saturates at ≈16.6
and memorised examples all tie.

LiRA: K reference models, each trained on a known random half of a common pool, give per example
the distribution of φ when it was in training ("in") and when it was not ("out"). The target's φ is
then tested against them: offline, how far above the "out" Gaussian it lies ((φ − μ_out) / σ_out,
one-sided as in the paper); online, the log likelihood ratio of the "in" and "out" Gaussians (needs
both: K ≥ 4). With fewer than 64 reference models per side the per-example variance is too noisy and
one variance per side is used for all examples (the paper's "fixed variance"), pooled from each
example's spread around its own mean (with one model per example and side, K = 2: the spread of all
that side's scores, as in the paper's published code); the means stay per example.

U-LiRA: per forget example, the same Gaussian likelihood ratio separates models that *unlearned* it
from models *retrained* without it, fitted leave-one-out (model i is scored by Gaussians fitted on the
other 2K − 1 models), so no model is judged by a fit it was part of. At chance (a method whose
unlearned models are retrained models in distribution) the best-threshold balanced accuracy still sits
above ½ because the threshold is chosen on the scores; relabelling the 2K models at random gives that
chance level and a p-value.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import norm

from pipeline.evaluation import attacks

GLOBAL_VARIANCE_BELOW = 64  # reference models (per side) below which one variance is used for all examples
MIN_REFERENCES = 2  # offline LiRA: every pool example needs an "out" reference model
MIN_ONLINE_REFERENCES = 4  # online LiRA: at least two "in" and two "out" models per example on average
_STD_FLOOR = 1e-6


def paired_halves(k: int, n: int, seed: int) -> np.ndarray:
    """(k, n) membership of k reference models over a pool of n examples: models 2j and 2j+1 take
    complementary random halves (coins seeded by seed + j), so for even k every example is in exactly
    k / 2 of them, and model j's half does not depend on k (reference runs can be reused when k grows)."""
    if k < 1 or n < 1:
        raise ValueError(f"need k ≥ 1 reference models and a pool of n ≥ 1 examples; got k={k}, n={n}.")
    rows = []
    for j in range((k + 1) // 2):
        coin = np.random.default_rng([seed, j]).random(n) < 0.5
        rows.extend([coin, ~coin])
    return np.stack(rows[:k])


def uses_fixed_variance(k: int) -> bool:
    """Whether K reference models (about K/2 per side) are too few for a variance per example."""
    return k < 2 * GLOBAL_VARIANCE_BELOW


def _side_moments(scores: np.ndarray, member: np.ndarray, fixed_variance: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean and std of the scores where `member` is True (NaN where an example has none)."""
    count = member.sum(axis=0)
    total = np.where(member, scores, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / count, np.nan)
        dev = np.where(member, (scores - np.where(count > 0, mean, 0.0)) ** 2, 0.0).sum(axis=0)
        if not fixed_variance:
            std = np.where(count > 1, np.sqrt(dev / np.maximum(count - 1, 1)), np.nan)
        elif (count > 1).any():  # pooled within-example variance: each example's spread around its own mean
            std = np.full(scores.shape[1], np.sqrt(dev.sum() / np.maximum(count - 1, 0).sum()))
        else:  # one model per example on this side (K = 2): the spread of all its scores
            values = scores[member]
            std = np.full(scores.shape[1], values.std() if values.size > 1 else np.nan)
    return mean, np.maximum(std, _STD_FLOOR)


def lira_scores(target: np.ndarray, references: np.ndarray, reference_member: np.ndarray,
                online: bool, fixed_variance: bool | None = None) -> np.ndarray:
    """Membership score per example (higher: more likely in the target's training set); NaN where the
    reference models cannot score it (offline: no "out" model; online: no "in" or no "out" model).
    `references` (K, N) are the reference models' φ, `reference_member` (K, N) whether each trained on
    each example, `target` (N,) the target's φ."""
    target = np.asarray(target, dtype=np.float64)
    refs = np.asarray(references, dtype=np.float64)
    member = np.asarray(reference_member, dtype=bool)
    if refs.ndim != 2 or refs.shape != member.shape or refs.shape[1] != target.size:
        raise ValueError(f"references {refs.shape} and reference_member {member.shape} must be (K, N) with N = {target.size}.")
    if fixed_variance is None:
        fixed_variance = uses_fixed_variance(refs.shape[0])
    mu_out, sd_out = _side_moments(refs, ~member, fixed_variance)
    if not online:
        return (target - mu_out) / sd_out
    mu_in, sd_in = _side_moments(refs, member, fixed_variance)
    return norm.logpdf(target, mu_in, sd_in) - norm.logpdf(target, mu_out, sd_out)


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, max_fpr: float,
               confidence: float = 0.95) -> dict[str, float | list[float]]:
    """Highest TPR of "member iff score ≥ t" with FPR ≤ max_fpr, with a Clopper–Pearson interval on it
    (the threshold is picked on the same scores, so the interval is slightly optimistic)."""
    tp, fp = attacks.roc_counts(member_scores, nonmember_scores)
    members, nonmembers = np.asarray(member_scores).size, np.asarray(nonmember_scores).size
    best = int(tp[fp / nonmembers <= max_fpr + 1e-15].max())
    lo, hi = attacks.clopper_pearson(best, members, confidence)
    return {"tpr": best / members, "ci": [float(lo), float(hi)]}


def attack_summary(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict:
    """AUC (with a Hanley–McNeil 95% interval) and TPR at 1% and 0.1% FPR (Clopper–Pearson intervals)."""
    m = np.asarray(member_scores, dtype=np.float64)
    n = np.asarray(nonmember_scores, dtype=np.float64)
    result = attacks.threshold_attack(m, n)
    at_1, at_01 = tpr_at_fpr(m, n, 0.01), tpr_at_fpr(m, n, 0.001)
    return {"auc": result.auc, "auc_ci": attacks.auc_interval(result.auc, m.size, n.size),
            "tpr_at_1pct_fpr": at_1["tpr"], "tpr_at_1pct_fpr_ci": at_1["ci"],
            "tpr_at_0_1pct_fpr": at_01["tpr"], "tpr_at_0_1pct_fpr_ci": at_01["ci"],
            "balanced_accuracy": result.accuracy, "members": int(m.size), "nonmembers": int(n.size)}


def _check_groups(unlearned: np.ndarray, retrained: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u = np.asarray(unlearned, dtype=np.float64)
    r = np.asarray(retrained, dtype=np.float64)
    if u.ndim != 2 or u.shape != r.shape:
        raise ValueError(f"unlearned {u.shape} and retrained {r.shape} must both be (K, |F|).")
    if u.shape[0] < 2:
        raise ValueError(f"U-LiRA's leave-one-out fit needs K ≥ 2 models per group; got K={u.shape[0]}.")
    return u, r


def ulira_scores(unlearned: np.ndarray, retrained: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out U-LiRA scores, (K, |F|) each: higher means "this model unlearned the example"
    rather than "this model was retrained without it"."""
    u, r = _check_groups(unlearned, retrained)
    models = np.vstack([u, r])
    group = np.r_[np.ones(len(u), bool), np.zeros(len(r), bool)]
    fixed = len(u) - 1 < GLOBAL_VARIANCE_BELOW
    scores = np.empty_like(models)
    for i in range(len(models)):
        rest = np.arange(len(models)) != i
        member = np.broadcast_to(group[rest, None], (rest.sum(), models.shape[1]))
        scores[i] = lira_scores(models[i], models[rest], member, online=True, fixed_variance=fixed)
    return scores[group], scores[~group]


def ulira(unlearned: np.ndarray, retrained: np.ndarray, permutations: int = 200, seed: int = 0) -> dict:
    """U-LiRA over all (model, forget example) pairs: TPR at 1% / 0.1% FPR and the best-threshold
    balanced accuracy, with the chance level from `permutations` random relabellings of the models
    (`balanced_accuracy_null_mean`, and `p_value`: the share of relabellings at least as accurate)."""
    u, r = _check_groups(unlearned, retrained)
    su, sr = ulira_scores(u, r)
    out = attack_summary(su.ravel(), sr.ravel())
    if permutations:
        pooled, k = np.vstack([u, r]), len(u)
        rng = np.random.default_rng(seed)
        null = []
        for _ in range(permutations):
            order = rng.permutation(len(pooled))
            nu, nr = ulira_scores(pooled[order[:k]], pooled[order[k:]])
            null.append(attacks.threshold_attack(nu.ravel(), nr.ravel()).accuracy)
        null = np.asarray(null)
        out.update({"balanced_accuracy_null_mean": float(null.mean()),
                    "p_value": float((1 + np.sum(null >= out["balanced_accuracy"] - 1e-12)) / (1 + permutations))})
    return out
