"""`dpsisa score`: the NeurIPS-2023 unlearning score of SISA forgetting, against real retraining.

K "unlearned" ensembles (seeds s..s+K-1) are trained on all private data and then forget a random
forget set F through the product's forget path; K "retrained" ensembles (seeds s+K..s+2K-1) are
trained from scratch without F (`runs.train(exclude_ids=F)`). Per forget example, threshold
attacks on the logit-scaled true-class confidence φ (from logits, in float64) separate the two groups; their ε are bucketed
and averaged (`unlearning.unlearning_score`). The unlearned ensembles *before* forgetting give the
control: the score of doing nothing, which a method must beat for the score to mean anything.

With small K the score is a noisy, downward-biased estimate even for a perfect method: with K=3
per side, three unlearned scores all above three retrained ones happens by chance and costs that
example a bucket. Compare methods at the same K, and always with the control and with the
permutation baseline: relabelling the 2K models at random gives the F of a method that *is*
retraining in distribution at this K (`forgetting_quality_null_mean`) and a p-value for "the
unlearned models are distinguishable from retrained ones" (`forgetting_quality_p_value`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax

from pipeline.config import Config
from pipeline.core.checkpoints import atomic_write_json
from pipeline.data import datasets
from pipeline.errors import UserError
from pipeline.evaluation import lira
from pipeline.evaluation.unlearning import accuracy, logit_confidence_from_logits, permutation_null, unlearning_score
from pipeline.storage.paths import resolve_run_dir
from pipeline.tracking import groups as tracking_groups
from pipeline.verbs import references, runs

logger = logging.getLogger(__name__)

RETAIN_SAMPLE = 2000  # retain-set accuracy on at most this many random retained ids


class ScoreError(UserError, ValueError):
    """The scoring request is impossible (K < 1, forget set larger than the data); message names the fix."""


@dataclass(frozen=True)
class GroupScore:
    """One group of K ensembles scored against the K retrained ones: the challenge's score and forgetting
    quality, the per-example ε, the group's accuracies; the permutation baseline when it ran
    (permutations > 0) and U-LiRA when each group has two models or more (None otherwise; absent from
    the JSON then)."""

    forgetting_quality: float
    score: float
    epsilon_mean: float
    epsilon_max: float
    examples_in_first_bucket: float
    forget_accuracy: float
    retain_accuracy: float
    test_accuracy: float
    forgetting_quality_null_mean: float | None = None
    forgetting_quality_null_p05: float | None = None
    forgetting_quality_p_value: float | None = None
    ulira: dict[str, Any] | None = None  # lira.ulira's metrics (balanced accuracy, TPRs, its own null)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def line(self, name: str) -> str:
        null = (f"; at chance {self.forgetting_quality_null_mean:.3f}, p={self.forgetting_quality_p_value:.3f}"
                if self.forgetting_quality_p_value is not None else "")
        text = (f"  {name:<24}score {self.score:.3f} (forgetting quality {self.forgetting_quality:.3f}{null}; "
                f"mean per-example ε {self.epsilon_mean:.2f}); forget/retain/test accuracy "
                f"{self.forget_accuracy:.3f}/{self.retain_accuracy:.3f}/{self.test_accuracy:.3f}")
        u = self.ulira
        if not u:
            return text
        chance = (f" (at chance {u['balanced_accuracy_null_mean']:.3f}, p={u['p_value']:.3f})"
                  if "p_value" in u else "")
        return (text + f"\n  {'':<24}U-LiRA: balanced accuracy {u['balanced_accuracy']:.3f}{chance}, "
                f"TPR {u['tpr_at_1pct_fpr']:.3f} at 1% FPR, {u['tpr_at_0_1pct_fpr']:.3f} at 0.1% FPR")


@dataclass(frozen=True)
class Accuracies:
    forget_accuracy: float
    retain_accuracy: float
    test_accuracy: float


@dataclass(frozen=True)
class ScoreResult:
    """`dpsisa score`: SISA forgetting (`sisa`) and doing nothing (`control_no_unlearning`) scored against
    real retraining; `score` and `forgetting_quality` repeat `sisa`'s."""

    out_dir: str
    k: int
    forget_count: int
    forget_ids: tuple[int, ...]
    retain_sample: int
    delta: float
    permutations: int
    sisa: GroupScore
    control_no_unlearning: GroupScore
    retrained: Accuracies
    forget_seconds_mean: float
    total_seconds: float

    @property
    def score(self) -> float:
        return self.sisa.score

    @property
    def forgetting_quality(self) -> float:
        return self.sisa.forgetting_quality

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": self.out_dir, "k": self.k, "forget_count": self.forget_count, "forget_ids": list(self.forget_ids),
                "retain_sample": self.retain_sample, "delta": self.delta, "permutations": self.permutations,
                "score": self.score, "forgetting_quality": self.forgetting_quality, "sisa": self.sisa.to_dict(),
                "control_no_unlearning": self.control_no_unlearning.to_dict(), "retrained": asdict(self.retrained),
                "forget_seconds_mean": self.forget_seconds_mean, "total_seconds": self.total_seconds}

    def human(self) -> str:
        r = self.retrained
        return "\n".join([
            f"NeurIPS-2023 unlearning score, K={self.k} models per group, {self.forget_count} forgotten ids (δ={self.delta}):",
            self.sisa.line("SISA forget"), self.control_no_unlearning.line("control: no unlearning"),
            f"  retrained oracle        forget/retain/test accuracy {r.forget_accuracy:.3f}/"
            f"{r.retain_accuracy:.3f}/{r.test_accuracy:.3f}",
            f"  {self.out_dir} ({self.total_seconds:.0f}s)"])


def choose_ids(n_private: int, forget_count: int, seed: int) -> tuple[list[int], np.ndarray]:
    """Seeded forget set F and a retain sample drawn from the rest (at most RETAIN_SAMPLE ids)."""
    if not 0 < forget_count < n_private:
        raise ScoreError(f"--forget-count must be between 1 and {n_private - 1} (the private set has {n_private} ids).")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_private)
    forget = sorted(int(i) for i in order[:forget_count])
    retain = np.sort(order[forget_count:forget_count + RETAIN_SAMPLE])
    return forget, retain


def _group_summary(logits: dict[str, list[np.ndarray]], labels: dict[str, np.ndarray]) -> dict:
    """Mean accuracies (of each ensemble's mean softmax) over the K models of a group, and the (K, |F|)
    forget-set confidence scores φ, computed from the members' logits in float64 (no saturation)."""
    return {"forget_scores": np.stack([logit_confidence_from_logits(z, labels["forget"]) for z in logits["forget"]]),
            **{f"{split}_accuracy": float(np.mean([accuracy(softmax(z, axis=2).mean(axis=0), labels[split])
                                                   for z in logits[split]]))
               for split in ("forget", "retain", "test")}}


def _score(unlearned: dict, retrained: dict, delta: float, permutations: int = 200, seed: int = 0) -> GroupScore:
    result = unlearning_score(unlearned["forget_scores"], retrained["forget_scores"],
                              unlearned["retain_accuracy"], retrained["retain_accuracy"],
                              unlearned["test_accuracy"], retrained["test_accuracy"], delta=delta)
    eps = np.asarray(result.pop("epsilons"))
    if permutations:
        null = permutation_null(unlearned["forget_scores"], retrained["forget_scores"], delta, permutations, seed)
        result.update({f"forgetting_quality_{k}": v for k, v in null.items()})
    if len(unlearned["forget_scores"]) > 1:  # U-LiRA's leave-one-out fit needs two models per group
        result["ulira"] = lira.ulira(unlearned["forget_scores"], retrained["forget_scores"], permutations, seed)
    return GroupScore(**result, epsilon_mean=float(eps.mean()), epsilon_max=float(eps.max()),
                      examples_in_first_bucket=float(np.mean(eps < 0.5)),
                      **{f"{k}_accuracy": unlearned[f"{k}_accuracy"] for k in ("forget", "retain", "test")})


@tracking_groups.grouped("score")
def run_score(config: Config, out_dir: Path, k: int = 3, forget_count: int = 20, delta: float = 1e-5,
              permutations: int = 200) -> ScoreResult:
    """Train 2K ensembles under out_dir, forget F in K of them, and score SISA against retraining."""
    if k < 1:
        raise ScoreError("--k must be at least 1 (models per group; the challenge used 512, small K is noisy).")
    if permutations < 0:
        raise ScoreError("--permutations must be ≥ 0 (0 skips the exchangeability baseline).")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ScoreError(f"{out_dir} is not empty; choose a new --out-dir.")
    started = time.perf_counter()
    data = datasets.load(config.data)
    forget, retain = choose_ids(len(data.private.y), forget_count, config.seed)
    inputs = {"forget": data.private.x[forget], "retain": data.private.x[retain], "test": data.test.x}
    labels = {"forget": data.private.y[forget], "retain": data.private.y[retain], "test": data.test.y}
    groups: dict[str, dict[str, list[np.ndarray]]] = {g: {s: [] for s in inputs} for g in ("original", "unlearned", "retrained")}

    def predict_into(group: str, run_dir: Path) -> None:  # the live ensemble's (S, N, C) logits, in this process
        for split, x in inputs.items():
            groups[group][split].append(references.live_logits(resolve_run_dir(run_dir), x))

    forget_seconds = []
    for i in range(k):
        seed = config.seed + i
        logger.info(f"== unlearned model {i + 1}/{k} (seed {seed}): train on all data, then forget {len(forget)} ids")
        run_dir = out_dir / f"unlearned-{i}"
        runs.train(config.with_overrides({"seed": seed}), run_dir, hold=True)  # the forget replays on the actors
        try:                                                                            # that trained: no second start
            predict_into("original", run_dir)
            forget_seconds.append(runs.forget(run_dir, forget).seconds)
            predict_into("unlearned", run_dir)
        finally:
            runs.stop(run_dir)
    for i in range(k):
        seed = config.seed + k + i
        logger.info(f"== retrained model {i + 1}/{k} (seed {seed}): train from scratch without the forget set")
        run_dir = out_dir / f"retrained-{i}"
        runs.train(config.with_overrides({"seed": seed}), run_dir, exclude_ids=forget)
        predict_into("retrained", run_dir)
    stats = {g: _group_summary(groups[g], labels) for g in groups}
    sisa = _score(stats["unlearned"], stats["retrained"], delta, permutations, config.seed)
    control = _score(stats["original"], stats["retrained"], delta, permutations, config.seed)
    summary = ScoreResult(
        out_dir=str(out_dir), k=k, forget_count=len(forget), forget_ids=tuple(forget), retain_sample=int(len(retain)),
        delta=delta, permutations=permutations, sisa=sisa, control_no_unlearning=control,
        retrained=Accuracies(**{f"{s}_accuracy": stats["retrained"][f"{s}_accuracy"] for s in ("forget", "retain", "test")}),
        forget_seconds_mean=float(np.mean(forget_seconds)), total_seconds=time.perf_counter() - started)
    atomic_write_json(out_dir / "score.json", summary.to_dict())
    tracking_groups.log_job("score", config, out_dir, summary.to_dict())
    return summary
