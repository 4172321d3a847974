"""Yardsticks comparing an unlearned model with the retrained-from-scratch oracle.

Includes a numpy re-implementation of the NeurIPS 2023 machine-unlearning challenge score
(per-example epsilon from threshold attacks on K unlearned vs K retrained models, bucketed).
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import logsumexp

from pipeline.core.checkpoints import parameter_l2_distance  # noqa: F401  (unlearning.X kept for callers)

_CLIP = 1e-12


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of (N, C) class probabilities against integer labels."""
    probs = np.asarray(probs)
    labels = np.asarray(labels).ravel()
    if probs.ndim != 2 or probs.shape[0] != labels.size:
        raise ValueError(f"probs must be (N, C) matching labels (N,); got {probs.shape}, {labels.shape}")
    if labels.size == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float(np.mean(probs.argmax(axis=1) == labels))


def mean_kl_divergence(p_probs: np.ndarray, q_probs: np.ndarray, eps: float = 1e-12) -> float:
    """Mean over rows of KL(p || q), logs taken of clipped probs; exactly 0.0 when p equals q."""
    p = np.asarray(p_probs, dtype=np.float64)
    q = np.asarray(q_probs, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 2:
        raise ValueError(f"p and q must be (N, C) of equal shape; got {p.shape}, {q.shape}")
    log_ratio = np.log(np.clip(p, eps, 1.0)) - np.log(np.clip(q, eps, 1.0))
    rows = (p * log_ratio).sum(axis=1)
    return float(np.maximum(rows, 0.0).mean())  # clipping can leave tiny negatives; KL >= 0


def logit_scaled_confidence(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) of the true-class probability p (clipped to [1e-12, 1 - 1e-12]); the challenge's score, for
    callers that only have probabilities. From float32 probabilities it saturates at ≈16.6 (p rounds to 1): where
    logits are at hand use `logit_confidence_from_logits`."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64).ravel()
    if probs.ndim != 2 or probs.shape[0] != labels.size:
        raise ValueError(f"probs must be (N, C) matching labels (N,); got {probs.shape}, {labels.shape}")
    p = np.clip(probs[np.arange(labels.size), labels], _CLIP, 1.0 - _CLIP)
    return np.log(p) - np.log1p(-p)


def logit_confidence_from_logits(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """φ = log(p / (1 − p)) of the true-class probability, computed from logits in float64 without
    forming p: for one model, φ = z_y − logsumexp_{j≠y} z_j. `logits` is (N, C) for one model or
    (S, N, C) for an ensemble of S members whose output is their mean softmax; then
    φ = logsumexp_s(z_sy − lse_s) − logsumexp_s(lse_{s,j≠y} − lse_s), lse_s = logsumexp_j z_sj.
    Unlike `logit_scaled_confidence` on float32 probabilities (which round to 1 and saturate φ at
    ≈16.6), it keeps ranking memorised examples: LiRA's and U-LiRA's score."""
    z = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64).ravel()
    if z.ndim == 2:
        z = z[None]
    if z.ndim != 3 or z.shape[1] != labels.size or z.shape[2] < 2:
        raise ValueError(f"logits must be (N, C) or (S, N, C) with C ≥ 2 matching labels (N,); got {np.shape(logits)}, {labels.shape}")
    rows = np.arange(labels.size)
    true = z[:, rows, labels]  # (S, N)
    others = z.copy()
    others[:, rows, labels] = -np.inf
    lse_all = logsumexp(z, axis=2)
    lse_others = logsumexp(others, axis=2)
    return logsumexp(true - lse_all, axis=0) - logsumexp(lse_others - lse_all, axis=0)


def _interval_rates(unlearned: np.ndarray, retrained: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR and FNR of every attack "unlearned iff v_i <= score <= v_j" over observed values v, plus complements.

    Single-threshold attacks (score >= t, score <= t) are the intervals touching an end of the
    observed range, so they are included.
    """
    values = np.unique(np.concatenate([unlearned, retrained]))
    # cu[i] = number of unlearned scores <= values[i-1]; cu[0] = 0 (likewise cr for retrained).
    cu = np.r_[0, np.searchsorted(np.sort(unlearned), values, side="right")]
    cr = np.r_[0, np.searchsorted(np.sort(retrained), values, side="right")]
    i, j = np.triu_indices(values.size)  # interval [values[i], values[j]]
    tp = cu[j + 1] - cu[i]
    fp = cr[j + 1] - cr[i]
    fpr = fp / retrained.size
    fnr = 1.0 - tp / unlearned.size
    # Complement attack ("unlearned" outside the interval) swaps to 1 - rate; add the trivial attacks.
    fpr_all = np.r_[fpr, 1.0 - fpr, 0.0, 1.0]
    fnr_all = np.r_[fnr, 1.0 - fnr, 1.0, 0.0]
    return fpr_all, fnr_all


def per_example_epsilon(
    unlearned_scores: np.ndarray, retrained_scores: np.ndarray, delta: float = 1e-5
) -> float:
    """Max epsilon over single/double-threshold attacks separating K unlearned from K retrained scores.

    eps = max(log((1 - delta - fpr) / fnr), log((1 - delta - fnr) / fpr)). To keep it finite and
    meaningful for small K, rates are clipped to at least 1/(2K) (K = that side's sample count)
    before use; non-positive numerators are skipped; the result is floored at 0.
    """
    u = np.asarray(unlearned_scores, dtype=np.float64).ravel()
    r = np.asarray(retrained_scores, dtype=np.float64).ravel()
    if u.size == 0 or r.size == 0:
        raise ValueError("need at least one unlearned and one retrained score")
    if np.isnan(u).any() or np.isnan(r).any():
        raise ValueError("scores contain NaN")
    fpr, fnr = _interval_rates(u, r)
    fpr = np.maximum(fpr, 1.0 / (2 * r.size))
    fnr = np.maximum(fnr, 1.0 / (2 * u.size))
    best = 0.0
    for num, den in ((1.0 - delta - fpr, fnr), (1.0 - delta - fnr, fpr)):
        ok = num > 0
        if ok.any():
            best = max(best, float(np.max(np.log(num[ok] / den[ok]))))
    return best


def bucket_score(eps: float) -> float:
    """Challenge bucket credit 2**(-floor(eps / 0.5)): 1 for eps < 0.5, halving every 0.5; 0 for inf."""
    if math.isnan(eps) or eps < 0:
        raise ValueError(f"epsilon must be a non-negative number; got {eps}")
    if math.isinf(eps):
        return 0.0
    return float(2.0 ** (-math.floor(eps / 0.5)))


def forgetting_quality(unlearned_forget_scores: np.ndarray, retrained_forget_scores: np.ndarray,
                       delta: float = 1e-5) -> tuple[float, list[float]]:
    """F = mean bucket credit over forget examples, and the per-example ε; arrays are (K, n_forget)."""
    u = np.asarray(unlearned_forget_scores, dtype=np.float64)
    r = np.asarray(retrained_forget_scores, dtype=np.float64)
    if u.ndim != 2 or r.ndim != 2 or u.shape[1] != r.shape[1]:
        raise ValueError(f"score arrays must be (K, n_forget) with equal n_forget; got {u.shape}, {r.shape}")
    if u.shape[1] == 0:
        raise ValueError("no forget examples")
    epsilons = [per_example_epsilon(u[:, i], r[:, i], delta) for i in range(u.shape[1])]
    return float(np.mean([bucket_score(e) for e in epsilons])), epsilons


def permutation_null(unlearned_forget_scores: np.ndarray, retrained_forget_scores: np.ndarray, delta: float = 1e-5,
                     permutations: int = 200, seed: int = 0) -> dict[str, float]:
    """What F looks like when the two groups are exchangeable (the method is retraining in distribution).

    Models (rows) are relabelled at random, keeping each model's scores across examples together.
    `null_mean` is the expected F of a perfect method at this K and forget-set size (small K
    pulls it well below 1); `p_value` is the share of relabellings with F ≤ the observed F (with
    the observed labelling counted): a small p says the unlearned models are distinguishable from
    retrained ones beyond chance.
    """
    u = np.asarray(unlearned_forget_scores, dtype=np.float64)
    r = np.asarray(retrained_forget_scores, dtype=np.float64)
    observed, _ = forgetting_quality(u, r, delta)
    pooled, k = np.concatenate([u, r]), len(u)
    rng = np.random.default_rng(seed)
    null = np.array([forgetting_quality(pooled[order[:k]], pooled[order[k:]], delta)[0]
                     for order in (rng.permutation(len(pooled)) for _ in range(permutations))])
    return {"null_mean": float(null.mean()), "null_p05": float(np.quantile(null, 0.05)),
            "p_value": float((1 + np.sum(null <= observed + 1e-12)) / (1 + permutations))}


def score_permutation_null(unlearned_forget_scores: np.ndarray, retrained_forget_scores: np.ndarray,
                           retain_acc_unlearned: np.ndarray, retain_acc_retrained: np.ndarray,
                           test_acc_unlearned: np.ndarray, test_acc_retrained: np.ndarray, delta: float = 1e-5,
                           permutations: int = 200, seed: int = 0) -> dict[str, float]:
    """The permutation baseline of the whole score (F × accuracy ratios), not only of F: the 2K models are
    relabelled at random, each keeping its forget-set scores and its own retain and test accuracies (arrays of
    K per group), and the score is recomputed. A method that *is* retraining in distribution scores like a
    random relabelling: its score lies in the null's central 95% (`null_p025`..`null_p975`) about 95% of the
    time; a score above the band is too close to its oracle to be an independent retraining (e.g. a model
    compared with itself), one below it is distinguishable. `p_value`: the share of relabellings scoring ≤ the
    observed score (observed labelling counted). Same relabellings as `permutation_null` at the same seed, whose
    F baseline is returned too (`forgetting_quality_null_mean`, `forgetting_quality_p_value`)."""
    u = np.asarray(unlearned_forget_scores, dtype=np.float64)
    r = np.asarray(retrained_forget_scores, dtype=np.float64)
    accs = [np.asarray(a, dtype=np.float64).ravel() for a in (retain_acc_unlearned, retain_acc_retrained,
                                                               test_acc_unlearned, test_acc_retrained)]
    k = len(u)
    if any(a.size != n for a, n in zip(accs, (k, len(r), k, len(r)))):
        raise ValueError("give one retain and one test accuracy per model of each group")
    if permutations < 1:
        raise ValueError("need at least one permutation")
    retain, test = np.concatenate(accs[:2]), np.concatenate(accs[2:])
    pooled = np.concatenate([u, r])

    def score_of(rows_u: np.ndarray, rows_r: np.ndarray) -> tuple[float, float]:
        f, _ = forgetting_quality(pooled[rows_u], pooled[rows_r], delta)
        ratio = (retain[rows_u].mean() / retain[rows_r].mean()) * (test[rows_u].mean() / test[rows_r].mean())
        return f, f * ratio

    f_observed, observed = score_of(np.arange(k), np.arange(k, len(pooled)))
    rng = np.random.default_rng(seed)
    null = np.array([score_of(order[:k], order[k:]) for order in (rng.permutation(len(pooled)) for _ in range(permutations))])
    f_null, s_null = null[:, 0], null[:, 1]
    return {"null_mean": float(s_null.mean()), "null_p025": float(np.quantile(s_null, 0.025)),
            "null_p975": float(np.quantile(s_null, 0.975)),
            "p_value": float((1 + np.sum(s_null <= observed + 1e-12)) / (1 + permutations)),
            "forgetting_quality_null_mean": float(f_null.mean()),
            "forgetting_quality_p_value": float((1 + np.sum(f_null <= f_observed + 1e-12)) / (1 + permutations))}


def unlearning_score(
    unlearned_forget_scores: np.ndarray,
    retrained_forget_scores: np.ndarray,
    retain_acc_unlearned: float,
    retain_acc_retrained: float,
    test_acc_unlearned: float,
    test_acc_retrained: float,
    delta: float = 1e-5,
) -> dict[str, float | list[float]]:
    """Challenge score: mean bucket credit F over forget examples, times retain- and test-accuracy ratios.

    Score arrays are (K, n_forget): row k holds the forget-set scores of the k-th model.
    """
    if retain_acc_retrained <= 0 or test_acc_retrained <= 0:
        raise ValueError("retrained accuracies must be positive to form ratios")
    forgetting, epsilons = forgetting_quality(unlearned_forget_scores, retrained_forget_scores, delta)
    ratio = (retain_acc_unlearned / retain_acc_retrained) * (test_acc_unlearned / test_acc_retrained)
    return {"forgetting_quality": forgetting, "score": float(forgetting * ratio), "epsilons": epsilons}
