"""One Tune trial: a whole experiment (train → evaluate → forget k random ids → evaluate) inside
the trial's placement group, and the flat metrics it reports.
"""
from __future__ import annotations

import math
import shutil
import sys
from collections.abc import Callable
from typing import Any

import ray
from ray import tune

from pipeline.logs import show as show_messages
from pipeline.storage.ledger import Ledger
from pipeline.sweep.spec import SweepSpec, trial_bundles, trial_config, trial_dir
from pipeline.verbs import runs
from pipeline.verbs.access import held

AFTER = "_after_forget"


def trial_resources(spec: SweepSpec, point: dict[str, Any]) -> tune.PlacementGroupFactory:
    return tune.PlacementGroupFactory(trial_bundles(spec, point))


def _mia(key: str, field_name: str) -> Callable[[dict], Any]:
    return lambda summary: ((summary.get(key) or {}).get("posterior") or {}).get(field_name)


def _max_epsilon(summary: dict) -> float | None:
    spent = [e for e in summary.get("epsilon_spent") or [] if e is not None]
    return max(spent) if spent else None


# metric name → how to read it from an evaluate summary (absent values are skipped)
EVALUATION_METRICS: dict[str, Callable[[dict], Any]] = {
    "accuracy": lambda s: s.get("accuracy"),
    "accuracy_ci_low": lambda s: (s.get("accuracy_ci") or [None])[0],  # 95%, exact binomial over the test set
    "accuracy_ci_high": lambda s: (s.get("accuracy_ci") or [None, None])[1],
    "vote_accuracy": lambda s: s.get("vote_accuracy"),
    "ece": lambda s: s.get("ece"),
    "epsilon_spent_max": _max_epsilon,
    "epsilon_lower_bound": lambda s: s.get("epsilon_lower_bound"),
    **{f"mia_{f}": _mia("mia", f) for f in ("advantage", "auc", "tpr_at_1pct_fpr")},
    **{f"mia_forgotten_{f}": _mia("mia_forgotten", f) for f in ("advantage", "auc", "tpr_at_1pct_fpr")},
}
FORGET_METRICS: dict[str, Callable[[dict], Any]] = {
    "forget_seconds": lambda r: r["seconds"],
    "forget_speedup": lambda r: r["speedup"],
    "shards_retrained": lambda r: len(r["shards_retrained"]),
    "stages_replayed": lambda r: sum(int(v) for v in r["stages_replayed"].values()),
    "forget_work_fraction": lambda r: r.get("work_fraction"),
    "forget_samples_processed": lambda r: r.get("samples_processed"),
}


def _pick(registry: dict[str, Callable[[dict], Any]], summary: dict, suffix: str = "") -> dict[str, float]:
    values = {name + suffix: read(summary) for name, read in registry.items()}
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def evaluation_metrics(summary: dict, suffix: str = "") -> dict[str, float]:
    """Flat trial metrics from an evaluate summary (MIA ones once evaluate reports `mia`)."""
    return _pick(EVALUATION_METRICS, summary, suffix)


def forget_metrics(result: dict) -> dict[str, float]:
    return _pick(FORGET_METRICS, result)


def run_trial(point: dict[str, Any], spec: SweepSpec) -> None:
    """Tune trainable: one whole experiment in its own run dir, reported once via tune.report."""
    config = trial_config(spec, point)
    trial_id = tune.get_context().get_trial_id()
    run_dir = trial_dir(spec, trial_id)
    shutil.rmtree(run_dir, ignore_errors=True)  # a retried (resumed) trial starts over

    show_messages(lambda: sys.stdout, prefix=f"[{trial_id}] ", alone=True)  # this trial's progress, forwarded by Ray
    placement = ray.util.get_current_placement_group()
    trained = runs.train(config, run_dir, placement=placement)
    doomed = Ledger(run_dir).sample_ids(spec.forget_count, config.seed) if spec.forget_count else None
    with held(run_dir, placement):  # one coordinator (and shard actors) for the three verbs below
        # before forgetting, the ids to forget are attacked as `mia_forgotten` (still members)
        metrics = {**evaluation_metrics(runs.evaluate_run(run_dir, placement=placement, probe_ids=doomed)),
                   "full_train_seconds": float(trained["full_train_seconds"])}
        if trained.get("public_accuracy") is not None:  # what the private data bought: accuracy − public_accuracy
            metrics["public_accuracy"] = float(trained["public_accuracy"])
        if doomed:
            forgot = runs.forget(run_dir, doomed, placement=placement)
            metrics.update(forget_metrics(forgot.to_dict()))
            metrics.update(evaluation_metrics(runs.evaluate_run(run_dir, placement=placement), AFTER))
    tune.report(metrics)


def trial_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The metrics a trial reported, without Tune's bookkeeping keys."""
    names = set(EVALUATION_METRICS) | set(FORGET_METRICS) | {"full_train_seconds", "public_accuracy"}
    names |= {n + AFTER for n in EVALUATION_METRICS}
    return {k: float(v) for k, v in result.items() if k in names and isinstance(v, (int, float))}


