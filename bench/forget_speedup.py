"""Forget speed-up on Fashion-MNIST (S=5, R=5): median wall time of a one-id forget, end to end
(warm actors, ledger and checkpoint I/O, MLflow logging included) vs the full ensemble training.

    python bench/forget_speedup.py [--trials 5] [key=value config overrides]

Prints one JSON object. The SISA bound S·2R/(R+1) compares against one worker retraining
everything. Here the full training runs its S shards in parallel over the cluster's cores
while a one-id forget retrains one shard on one core, so we also report a core-normalised
speed-up: full-training wall time × cores it used / forget wall time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import config as config_mod  # noqa: E402
from pipeline.logs import show as show_messages  # noqa: E402
from pipeline.storage.ledger import Ledger  # noqa: E402
from pipeline.verbs import runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="jobs/configs/fmnist.yaml")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    show_messages()  # the verbs' progress on stderr (stdout: one JSON object)
    config = config_mod.load(args.config, ["shards.count=5", "shards.slices=5", "tracking.enabled=false", *args.overrides])
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    run_dir = Path(tempfile.mkdtemp(prefix="dpsisa-bench-")) / "run"
    trained = runs.train(config, run_dir, keep_alive=True)
    import ray

    cores_used = min(config.shards.count, int(ray.cluster_resources().get("CPU", 1)))
    ids = Ledger(run_dir).assignments()["sample_id"].to_numpy()
    rng = np.random.default_rng(config.seed)
    walls, replayed = [], []
    for trial in range(args.trials):
        target = int(rng.choice(ids))
        result = runs.forget(run_dir, [target]).to_dict()
        walls.append(result["seconds"])
        replayed.append(sum(result["stages_replayed"].values()))
        log(f"trial {trial + 1}/{args.trials}: id {target}: {result['seconds']:.2f}s, stages {result['stages_replayed']}")
    runs.stop(run_dir)
    S, R = config.shards.count, config.shards.slices
    bound = S * 2 * R / (R + 1)
    median = statistics.median(walls)
    speedup = trained["full_train_seconds"] / median
    core_speedup = trained["full_train_seconds"] * cores_used / median
    print(json.dumps({
        "benchmark": "forget_speedup", "dataset": config.data.name, "shards": S, "slices": R,
        "strategy": config.finetune.strategy, "epsilon": config.privacy.epsilon, "trials": args.trials,
        "full_train_seconds": round(trained["full_train_seconds"], 3),
        "forget_seconds_median": round(median, 3), "forget_seconds": [round(w, 3) for w in walls],
        "stages_replayed": replayed, "speedup": round(speedup, 3),
        "sisa_bound": round(bound, 3), "speedup_over_bound": round(speedup / bound, 3),
        "cores_used_by_full_training": cores_used, "core_normalised_speedup": round(core_speedup, 3),
        "core_normalised_speedup_over_bound": round(core_speedup / bound, 3),
        "accuracy": round(trained["accuracy"], 4),
    }))


if __name__ == "__main__":
    main()
