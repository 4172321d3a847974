"""Membership-inference attacks and an empirical (Clopper-Pearson) privacy audit.

Inputs are per-example softmax outputs computed elsewhere; everything here is numpy/scipy/sklearn.
Convention throughout: a higher score means "more likely a member".
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import beta, rankdata
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

_CLIP = 1e-12


def _check_probs(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64).ravel()
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probs must be (N, C) matching labels (N,); got {probs.shape}, {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError("labels out of range for the number of classes in probs")
    return probs, labels


def true_class_confidence(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Probability each example's true class receives; the Salem et al. posterior score."""
    probs, labels = _check_probs(probs, labels)
    return probs[np.arange(labels.size), labels]


def per_example_loss(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy of each example (probs clipped at 1e-12); the Yeom et al. loss score."""
    return -np.log(np.clip(true_class_confidence(probs, labels), _CLIP, 1.0))


def clopper_pearson(
    k: int | np.ndarray, n: int | np.ndarray, confidence: float = 0.95
) -> tuple[float, float] | tuple[np.ndarray, np.ndarray]:
    """Exact two-sided Clopper-Pearson interval for a binomial rate k/n; vectorised over arrays."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    k_arr = np.asarray(k, dtype=np.float64)
    n_arr = np.asarray(n, dtype=np.float64)
    if np.any(k_arr < 0) or np.any(k_arr > n_arr):
        raise ValueError("need 0 <= k <= n")
    alpha = 1.0 - confidence
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(k_arr > 0, beta.ppf(alpha / 2, k_arr, n_arr - k_arr + 1), 0.0)
        hi = np.where(k_arr < n_arr, beta.ppf(1 - alpha / 2, k_arr + 1, n_arr - k_arr), 1.0)
    lo = np.nan_to_num(lo, nan=0.0)
    hi = np.nan_to_num(hi, nan=1.0)
    if lo.ndim == 0:
        return float(lo), float(hi)
    return lo, hi


@dataclass(frozen=True)
class AttackResult:
    """Summary of one membership-inference attack; accuracy_ci tells whether it beats chance."""

    accuracy: float
    advantage: float
    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_0_1pct_fpr: float
    n_members: int
    n_nonmembers: int
    accuracy_ci: tuple[float, float]

    def to_dict(self) -> dict[str, float | int | list[float]]:
        """Plain-Python (JSON-serialisable) view of the result."""
        return {
            "accuracy": float(self.accuracy),
            "advantage": float(self.advantage),
            "auc": float(self.auc),
            "tpr_at_1pct_fpr": float(self.tpr_at_1pct_fpr),
            "tpr_at_0_1pct_fpr": float(self.tpr_at_0_1pct_fpr),
            "n_members": int(self.n_members),
            "n_nonmembers": int(self.n_nonmembers),
            "accuracy_ci": [float(self.accuracy_ci[0]), float(self.accuracy_ci[1])],
        }


def _scores(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    return arr


def roc_counts(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(TP, FP) counts for "member iff score >= t" at every distinct t, from t=+inf down; ties move together."""
    m = _scores(member_scores, "member_scores")
    n = _scores(nonmember_scores, "nonmember_scores")
    scores = np.concatenate([m, n])
    is_member = np.concatenate([np.ones(m.size), np.zeros(n.size)])
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], is_member[order]
    group_end = np.r_[s[1:] != s[:-1], True]  # last position of each tied group
    tp = np.cumsum(y)[group_end]
    fp = np.cumsum(1.0 - y)[group_end]
    return np.r_[0.0, tp], np.r_[0.0, fp]


def threshold_attack(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> AttackResult:
    """Best single-threshold attack over the exact ROC; AUC is the Mann-Whitney statistic (ties 1/2)."""
    m = _scores(member_scores, "member_scores")
    n = _scores(nonmember_scores, "nonmember_scores")
    tp, fp = roc_counts(m, n)
    tpr, fpr = tp / m.size, fp / n.size
    gap = tpr - fpr
    best = int(np.argmax(gap))
    advantage = float(gap[best])
    accuracy = 0.5 * (1.0 + advantage)  # balanced accuracy = (TPR + TNR) / 2
    ranks = rankdata(np.concatenate([m, n]))  # average ranks: ties count 1/2
    u_stat = ranks[: m.size].sum() - m.size * (m.size + 1) / 2.0
    auc = float(u_stat / (m.size * n.size))
    # CI on the correct-count at the chosen threshold; equals balanced accuracy when sizes match.
    # It ignores that the threshold was picked on the same data, so it is slightly optimistic.
    correct = round(float(tp[best] + (n.size - fp[best])))
    lo, hi = clopper_pearson(correct, m.size + n.size)

    def tpr_at(max_fpr: float) -> float:
        return float(tpr[fpr <= max_fpr + 1e-15].max())

    return AttackResult(
        accuracy=float(accuracy),
        advantage=advantage,
        auc=auc,
        tpr_at_1pct_fpr=tpr_at(0.01),
        tpr_at_0_1pct_fpr=tpr_at(0.001),
        n_members=int(m.size),
        n_nonmembers=int(n.size),
        accuracy_ci=(float(lo), float(hi)),
    )


def auc_interval(auc: float, members: int, nonmembers: int, z: float = 1.96) -> list[float]:
    """Normal-approximation 95% interval of an AUC (Hanley & McNeil 1982): how much a small forget
    set can tell (10 members give roughly ±0.18)."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (members - 1) * (q1 - auc**2) + (nonmembers - 1) * (q2 - auc**2)) / (members * nonmembers)
    half = z * float(np.sqrt(max(var, 0.0)))
    return [max(0.0, auc - half), min(1.0, auc + half)]


def posterior_attack(
    member_probs: np.ndarray, member_labels: np.ndarray,
    nonmember_probs: np.ndarray, nonmember_labels: np.ndarray,
) -> AttackResult:
    """Salem et al. (2019): threshold the true-class confidence."""
    return threshold_attack(
        true_class_confidence(member_probs, member_labels),
        true_class_confidence(nonmember_probs, nonmember_labels),
    )


def loss_attack(
    member_probs: np.ndarray, member_labels: np.ndarray,
    nonmember_probs: np.ndarray, nonmember_labels: np.ndarray,
) -> AttackResult:
    """Yeom et al. (2018): threshold the negative cross-entropy loss."""
    return threshold_attack(
        -per_example_loss(member_probs, member_labels),
        -per_example_loss(nonmember_probs, nonmember_labels),
    )


def attack_features(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example features [true-class confidence, loss, max prob, entropy] for the learned attack."""
    probs, labels = _check_probs(probs, labels)
    clipped = np.clip(probs, _CLIP, 1.0)
    entropy = -(probs * np.log(clipped)).sum(axis=1)
    return np.column_stack([
        true_class_confidence(probs, labels), per_example_loss(probs, labels), probs.max(axis=1), entropy,
    ])


def logistic_attack(
    member_probs: np.ndarray, member_labels: np.ndarray,
    nonmember_probs: np.ndarray, nonmember_labels: np.ndarray,
    seed: int = 0, folds: int = 5,
) -> AttackResult:
    """Logistic-regression attack scored out-of-fold (stratified k-fold), so no example scores itself."""
    x = np.vstack([attack_features(member_probs, member_labels),
                   attack_features(nonmember_probs, nonmember_labels)])
    n_mem = np.asarray(member_labels).size
    y = np.r_[np.ones(n_mem, dtype=int), np.zeros(x.shape[0] - n_mem, dtype=int)]
    k = min(int(folds), n_mem, x.shape[0] - n_mem)
    if k < 2:
        raise ValueError(f"need at least 2 members and 2 non-members for {folds}-fold CV")
    scores = np.empty(x.shape[0])
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for train_idx, test_idx in splitter.split(x, y):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
        model.fit(x[train_idx], y[train_idx])
        scores[test_idx] = model.predict_proba(x[test_idx])[:, 1]
    return threshold_attack(scores[y == 1], scores[y == 0])


def balanced_sample(
    member_ids: np.ndarray, nonmember_ids: np.ndarray, n: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draw n ids from each side without replacement (n=None: the smaller size); same seed, same draw."""
    member_ids, nonmember_ids = np.asarray(member_ids), np.asarray(nonmember_ids)
    limit = min(member_ids.size, nonmember_ids.size)
    n = limit if n is None else int(n)
    if not 0 <= n <= limit:
        raise ValueError(f"n={n} must be between 0 and min(len(members), len(nonmembers))={limit}")
    rng = np.random.default_rng(seed)
    pick_m = np.sort(rng.permutation(member_ids.size)[:n])
    pick_n = np.sort(rng.permutation(nonmember_ids.size)[:n])
    return member_ids[pick_m], nonmember_ids[pick_n]


def run_attacks(
    member_probs: np.ndarray, member_labels: np.ndarray,
    nonmember_probs: np.ndarray, nonmember_labels: np.ndarray,
    seed: int = 0,
) -> dict[str, AttackResult]:
    """Run the posterior, loss and logistic attacks on the same member/non-member split. The learned
    attack needs two examples per side for its cross-validation: with fewer (e.g. one forgotten id)
    it is left out rather than failing the whole evaluation."""
    args = (member_probs, member_labels, nonmember_probs, nonmember_labels)
    results = {"posterior": posterior_attack(*args), "loss": loss_attack(*args)}
    if min(np.asarray(member_labels).size, np.asarray(nonmember_labels).size) >= 2:
        results["logistic"] = logistic_attack(*args, seed=seed)
    return results


def epsilon_lower_bound(
    member_scores: np.ndarray, nonmember_scores: np.ndarray, delta: float,
    confidence: float = 0.95, simultaneous: bool = True,
) -> float:
    """Audit lower bound on epsilon from threshold attacks with Clopper-Pearson rate bounds.

    Valid only at the stated confidence and only if each score is an independent trial of the DP
    membership game: on an (eps, delta)-DP model the result exceeds eps with probability at most
    1 - confidence. simultaneous=True (default) Bonferroni-splits 1 - confidence across the thresholds,
    which is what makes taking the max over thresholds valid; False uses per-threshold intervals
    (tighter, but the max over thresholds then overstates the confidence).
    Uses eps >= log((TPR_lo - delta) / FPR_hi) and eps >= log((TNR_lo - delta) / FNR_hi); floored at 0.
    """
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1); got {delta}")
    m = _scores(member_scores, "member_scores")
    n = _scores(nonmember_scores, "nonmember_scores")
    tp, fp = roc_counts(m, n)
    level = 1.0 - (1.0 - confidence) / tp.size if simultaneous else confidence
    tpr_lo, _ = clopper_pearson(tp, m.size, level)
    _, fpr_hi = clopper_pearson(fp, n.size, level)
    tnr_lo, _ = clopper_pearson(n.size - fp, n.size, level)  # = 1 - fpr_hi
    _, fnr_hi = clopper_pearson(m.size - tp, m.size, level)  # = 1 - tpr_lo
    best = 0.0
    for num, den in ((tpr_lo - delta, fpr_hi), (tnr_lo - delta, fnr_hi)):
        ok = (num > 0) & (den > 0)
        if ok.any():
            best = max(best, float(np.max(np.log(num[ok] / den[ok]))))
    return best
