"""The privacy-audit table: per ε target (none, 8, 2, 1), the one-run canary audit's ε lower bound and
LiRA's TPR at low FPR, with the accuracy each run reaches. Prints one JSON object.

Per ε: `audit.run_audit` (M canaries, the run trained once, then the same config without canaries for
the accuracy comparison) and LiRA (`references.py`): a target trained on a random half of the private
pool (`data.keep_half`) and attacked by `dpsisa evaluate --attack lira --reference-models K`, whose K
reference runs are trained with the same ε. All through the product's Ray path (a local cluster).

    python bench/privacy_audit.py [--config jobs/configs/audit_digits.yaml] [--canaries 200]
        [--reference-models 4] [--epsilons none,8,2,1] [--out DIR] [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import config as config_mod  # noqa: E402
from pipeline.verbs import (
    audit,
    runs,  # noqa: E402
)

ROOT = Path(__file__).resolve().parents[1]


def _row(epsilon: str, config, args, out: Path) -> dict:
    started = time.perf_counter()
    one_run = audit.run_audit(config, args.canaries, run_dir=out / f"audit-eps-{epsilon}")
    audit_seconds = time.perf_counter() - started
    target = out / f"lira-eps-{epsilon}"
    trained = runs.train(config.with_overrides({"data.keep_half": 1}), target)
    lira = runs.evaluate_run(target, reference_models=args.reference_models)["lira"]
    print(f"ε={epsilon}: bound {one_run.epsilon_lower_bound:.3f}, LiRA offline TPR@0.1% "
          f"{lira['offline']['tpr_at_0_1pct_fpr']:.4f} ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
    return {
        "epsilon_target": None if epsilon == "none" else float(epsilon), "epsilon": one_run.epsilon,
        "epsilon_lower_bound": one_run.epsilon_lower_bound, "bound_over_epsilon": one_run.bound_over_epsilon,
        "correct_guesses": one_run.correct_guesses, "guesses": one_run.guesses,
        "test_accuracy": one_run.test_accuracy_without_canaries, "test_accuracy_with_canaries": one_run.test_accuracy,
        "lira_target_accuracy": trained["accuracy"],
        **{f"lira_{variant}_{key}": (lira[variant] or {}).get(key) for variant in ("offline", "online")
           for key in ("auc", "auc_ci", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "tpr_at_0_1pct_fpr_ci")},
        "lira_members": lira["offline"]["members"], "audit_seconds": audit_seconds,
        "lira_seconds": time.perf_counter() - started - audit_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "jobs" / "configs" / "audit_digits.yaml"))
    parser.add_argument("--canaries", type=int, default=200)
    parser.add_argument("--reference-models", type=int, default=4)
    parser.add_argument("--epsilons", default="none,8,2,1")
    parser.add_argument("--out", default=None, help="where the runs go (default: a new temporary folder)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="dpsisa-privacy-audit-"))
    started, rows = time.perf_counter(), []
    for epsilon in args.epsilons.split(","):
        value = "null" if epsilon == "none" else epsilon
        config = config_mod.load(args.config, [*args.overrides, f"privacy.epsilon={value}"])
        rows.append(_row(epsilon, config, args, out))
    print(json.dumps({
        "config": args.config, "overrides": args.overrides, "canaries": args.canaries,
        "reference_models": args.reference_models, "rows": rows, "out": str(out),
        "seconds": time.perf_counter() - started,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU used"}))


if __name__ == "__main__":
    main()
