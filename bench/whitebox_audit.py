"""The white-box audit table: per ε target (1, 2, 4, 8, none) the white-box one-run bound beside its
randomised-response ceiling, the ideal auditor's median (and 99th percentile) and the noise
calibration p-value; then two broken runs that claim ε=1: noise silently halved, and cut to σ/100.
Prints one JSON object.

Each row is `audit_whitebox.run_whitebox_audit` (shard 0 trained in this process, M gradient
canaries; no Ray). The broken rows hand the trainer a recipe whose σ is scaled after the accountant
calibrated it for ε=1, exactly as the tests do: production code has no switch for it.

    python bench/whitebox_audit.py [--config jobs/configs/digits.yaml] [--canaries 1000]
        [--epsilons 1,2,4,8,none] [--broken 0.5,0.01] [--out DIR] [key=value ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import config as config_mod  # noqa: E402
from pipeline.verbs import audit_whitebox  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("epsilon", "epsilon_lower_bound", "epsilon_lower_bound_ceiling", "epsilon_lower_bound_ideal",
        "epsilon_lower_bound_ideal_p99", "noise_calibration_p", "correct_guesses", "guesses", "canaries_included",
        "sigma", "steps", "sample_rate", "unit", "strategy", "trainable_parameters", "test_accuracy", "seconds")


class _ScaledNoise:
    """The audit's trainer with σ scaled after accounting (the recipe keeps the calibrated σ and ε)."""

    def __init__(self, scale: float):
        self.scale, self.honest = scale, audit_whitebox.ShardTrainer

    def __enter__(self):
        scale, honest = self.scale, self.honest
        if scale == 1.0:
            return

        class Scaled(honest):
            def __init__(self, pretrained, plan, recipe, *args, **kwargs):
                super().__init__(pretrained, plan, dataclasses.replace(recipe, noise_multiplier=recipe.noise_multiplier * scale),
                                 *args, **kwargs)

        audit_whitebox.ShardTrainer = Scaled

    def __exit__(self, *exc):
        audit_whitebox.ShardTrainer = self.honest


def _row(label: str, config, canaries: int, out: Path, noise_scale: float = 1.0) -> dict:
    with _ScaledNoise(noise_scale):
        result = audit_whitebox.run_whitebox_audit(config, canaries, run_dir=out / f"whitebox-{label}")
    row = {"row": label, "epsilon_target": config.privacy.epsilon, "noise_scale": noise_scale,
           **{k: getattr(result, k) for k in KEYS}}
    print(f"{label}: bound {row['epsilon_lower_bound']:.3f}, ideal {row['epsilon_lower_bound_ideal']}, "
          f"ceiling {row['epsilon_lower_bound_ceiling']}, p {row['noise_calibration_p']} ({row['seconds']:.0f}s)", file=sys.stderr)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "jobs" / "configs" / "digits.yaml"))
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--epsilons", default="1,2,4,8,none")
    parser.add_argument("--broken", default="0.5,0.01", help="noise scales of the broken rows claiming ε=1 ('' for none)")
    parser.add_argument("--out", default=None, help="where the audits go (default: a new temporary folder)")
    parser.add_argument("overrides", nargs="*", default=["finetune.strategy=full"])
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="dpsisa-whitebox-audit-"))
    started, rows = time.perf_counter(), []
    for epsilon in args.epsilons.split(","):
        value = "null" if epsilon == "none" else epsilon
        rows.append(_row(f"eps-{epsilon}", config_mod.load(args.config, [*args.overrides, f"privacy.epsilon={value}"]),
                         args.canaries, out))
    for scale in filter(None, args.broken.split(",")):
        config = config_mod.load(args.config, [*args.overrides, "privacy.epsilon=1"])
        rows.append(_row(f"eps-1-noise-x{scale}", config, args.canaries, out, float(scale)))
    print(json.dumps({
        "config": args.config, "overrides": args.overrides, "canaries": args.canaries, "rows": rows, "out": str(out),
        "seconds": time.perf_counter() - started,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU used"}))


if __name__ == "__main__":
    main()
