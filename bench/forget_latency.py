"""Forget latency with a warm coordinator and warm shard actors, end to end, versus the owning
shard's own replay time; on a local run directory and on an s3:// one (a moto S3 server).

    python bench/forget_latency.py [--trials 5] [--storage local|s3|both] [--slice -1]
                                   [--config jobs/configs/digits.yaml] [key=value config overrides]

Trains one run per storage with `keep_alive` (its coordinator and shard actors stay up), then
forgets one id per trial through `runs.forget`, alternating the owning shard, taking ids from
one slice (default the last: the replay is a single stage, where fixed costs weigh most).

Per trial:
  seconds        ForgetResult.seconds: submit to the coordinator → request done, as the caller waited
  shard_seconds  the owning shard actor's own forget (manifest read, stage load, replay, ε, data file, commit)
  overhead       seconds − shard_seconds (target: ≤ 30% of shard_seconds)
  verb_seconds   the whole `runs.forget` call (config/ledger reads, attach, bookkeeping) around it

Prints one JSON object; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import config as config_mod  # noqa: E402
from pipeline.logs import show as show_messages  # noqa: E402
from pipeline.storage.rundir import RunDir  # noqa: E402
from pipeline.verbs import runs  # noqa: E402

TARGET_OVERHEAD_FRACTION = 0.30


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pick_targets(run_dir, slice_index: int, trials: int, shards: int, seed: int) -> list[int]:
    """`trials` distinct ids of slice `slice_index`, not yet forgotten, alternating the owning shard."""
    ledger = RunDir(run_dir).ledger()
    table = ledger.assignments()
    ids, shard, slc = (table[c].to_numpy() for c in ("sample_id", "shard", "slice"))
    free = (slc == slice_index) & ~np.isin(ids, np.fromiter(ledger.forgotten_ids(status=None), np.int64))
    rng = np.random.default_rng(seed)
    pools = {s: list(rng.permutation(ids[free & (shard == s)])) for s in range(shards)}
    targets = []
    for trial in range(trials):
        pool = pools[trial % shards] or next((p for p in pools.values() if p), None)
        if not pool:
            raise SystemExit(f"slice {slice_index} has only {len(targets)} ids left to forget; lower --trials.")
        targets.append(int(pool.pop()))
    return targets


def measure(config, run_dir, slice_index: int, trials: int, warmup: int) -> dict:
    trained = runs.train(config, run_dir, keep_alive=True)
    rows = []
    try:
        targets = pick_targets(run_dir, slice_index, warmup + trials, config.shards.count, config.seed)
        for n, target in enumerate(targets):
            started = time.perf_counter()
            result = runs.forget(run_dir, [target])
            verb = time.perf_counter() - started
            shard, shard_s = max(result.shard_seconds.items(), key=lambda kv: kv[1])
            overhead = result.seconds - shard_s
            label = f"warm-up {n + 1}/{warmup}" if n < warmup else f"trial {n - warmup + 1}/{trials}"
            log(f"{label}: id {target} (shard {shard}, stages {result.stages_replayed}): {result.seconds:.3f}s end to "
                f"end, shard {shard_s:.3f}s, overhead {overhead:.3f}s ({overhead / max(shard_s, 1e-9):.0%}); "
                f"runs.forget {verb:.3f}s")
            if n >= warmup:
                rows.append({"id": target, "shard": int(shard), "stages": sum(result.stages_replayed.values()),
                             "seconds": result.seconds, "shard_seconds": shard_s, "overhead": overhead,
                             "fraction": overhead / max(shard_s, 1e-9), "verb": verb})
    finally:
        runs.stop(run_dir)

    def col(key: str, digits: int = 3) -> list:
        return [round(r[key], digits) if isinstance(r[key], float) else r[key] for r in rows]

    def med(key: str, digits: int = 3) -> float:
        return round(statistics.median(r[key] for r in rows), digits)

    return {
        "run_dir": str(run_dir), "full_train_seconds": round(trained["full_train_seconds"], 3),
        "median_seconds": med("seconds"), "median_shard_seconds": med("shard_seconds"),
        "median_overhead_seconds": med("overhead"), "median_overhead_fraction": med("fraction"),
        "meets_target": med("fraction") <= TARGET_OVERHEAD_FRACTION,
        "median_verb_seconds": med("verb"),
        "median_verb_overhead_seconds": round(statistics.median(r["verb"] - r["shard_seconds"] for r in rows), 3),
        "seconds": col("seconds"), "shard_seconds": col("shard_seconds"), "overhead_seconds": col("overhead"),
        "overhead_fraction": col("fraction"), "verb_seconds": col("verb"),
        "ids": col("id"), "shards": col("shard"), "stages_replayed": col("stages"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="jobs/configs/digits.yaml")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=0, help="untimed forgets before the trials (default 0)")
    parser.add_argument("--storage", choices=["local", "s3", "both"], default="both")
    parser.add_argument("--slice", type=int, default=-1, help="slice the forgotten ids come from (-1: the last)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    show_messages()  # the verbs' progress on stderr (stdout: one JSON object)
    stdout, sys.stdout = sys.stdout, sys.stderr  # stdout: the one JSON object (Ray forwards worker output to sys.stdout)
    config = config_mod.load(args.config, ["shards.count=2", "shards.slices=3", "tracking.enabled=false", *args.overrides])
    slices = config.shards.slices
    if not -slices <= args.slice < slices:
        parser.error(f"--slice {args.slice} is outside 0..{slices - 1}")
    slice_index = args.slice % slices
    storages = ["local", "s3"] if args.storage == "both" else [args.storage]

    out = {"benchmark": "forget_latency", "dataset": config.data.name, "shards": config.shards.count, "slices": slices,
           "slice": slice_index, "strategy": config.finetune.strategy, "epsilon": config.privacy.epsilon,
           "trials": args.trials, "warmup": args.warmup, "target_overhead_fraction": TARGET_OVERHEAD_FRACTION}
    with contextlib.ExitStack() as stack:
        if "s3" in storages:
            # Before Ray starts: its workers (coordinator, shard actors) inherit the AWS_* env it sets.
            sys.path.insert(0, str(ROOT / "tests"))
            from s3_server import moto_s3

            store = stack.enter_context(moto_s3())
            log(f"moto S3 server at {store.endpoint}")
        for storage in storages:
            if storage == "local":
                run_dir = Path(tempfile.mkdtemp(prefix="dpsisa-bench-")) / "run"
            else:
                run_dir = f"{store.bucket_uri}/bench-{uuid.uuid4().hex[:8]}/run"
            log(f"--- {storage}: {run_dir}")
            out[storage] = measure(config, run_dir, slice_index, args.trials, args.warmup)
        import ray

        out["machine"] = {"platform": platform.platform(), "python": platform.python_version(),
                          "cpu_count": os.cpu_count(), "ray_cpus": ray.cluster_resources().get("CPU")}
    out["note"] = (f"one machine with {os.cpu_count()} cores runs the driver, the run's coordinator and its "
                   f"{config.shards.count} shard actors (one warm actor per shard, idle ones included), so the "
                   "coordinator's polling and Ray's own processes compete with the replaying shard for the same cores. "
                   "shard_seconds is the shard actor's own forget: manifest read, stage load, replay, ε of the release, "
                   "its data file less the erased ids and the manifest commit; the overhead is everything else (the "
                   "coordinator's ledger writes and receipt, Ray calls, the client's polling).")
    print(json.dumps(out), file=stdout)


if __name__ == "__main__":
    main()
