"""Erasure requests as they arrive: a Poisson stream of single-subject requests against one run.

For each partition (`uniform`, `by_subject`) one run is trained and kept warm, then:
  coalesced      requests are submitted as they arrive (`runs.submit`, i.e. `forget --no-wait`);
                 the run's coordinator runs one pipeline per shard: an idle shard replays once for
                 every request waiting for it. Latency is accept → done from the ledger's own timestamps
                 (`requested_at`, `completed_at`); throughput is requests over first accept → last done.
  one_at_a_time  the same kind of request, each submitted after the previous one is done
                 (`runs.forget`): what the product did before coalescing.
Prints one JSON object (progress on stderr).

  python bench/deletion_throughput.py                    # Fashion-MNIST, S=10, R=4, 2,000 requests at 10,000/h
  python bench/deletion_throughput.py --requests 300 --serial-requests 10 --partitions by_subject
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import config as config_mod  # noqa: E402
from pipeline.logs import show as show_messages  # noqa: E402
from pipeline.sisa import cluster
from pipeline.storage.rundir import RunDir  # noqa: E402
from pipeline.verbs import runs  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quantile(values: list[float], q: float) -> float:
    return float(np.quantile(np.asarray(values), q)) if values else float("nan")


def _subjects(run: RunDir, count: int, seed: int) -> list[str]:
    names = sorted(set(run.ledger().assignments()["subject_id"].to_pylist()))
    return np.random.default_rng(seed).choice(names, size=min(count, len(names)), replace=False).tolist()


def coalesced(run: RunDir, subjects: list[str], rate_per_hour: float, seed: int) -> dict:
    """Submit at Poisson arrival times; wait until everything is done; read latencies from the ledger."""
    gaps = np.random.default_rng(seed).exponential(3600.0 / rate_per_hour, size=len(subjects))
    arrivals = np.cumsum(gaps) - gaps[0]
    submitted: list[str] = []
    late = []
    start = time.monotonic()
    for k, (subject, at) in enumerate(zip(subjects, arrivals)):
        delay = start + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            late.append(-delay)
        submitted.append(runs.submit(run, None, subjects=[subject]).request_id)
        if (k + 1) % max(1, len(subjects) // 20) == 0:
            log(f"  submitted {k + 1}/{len(subjects)} ({len(run.ledger().pending())} pending)")
    deadline = time.monotonic() + 3600
    while run.ledger().pending() and time.monotonic() < deadline:
        time.sleep(1.0)
    runs.request_status(run, submitted[-1], wait=True)  # (raises if it cannot finish)
    table = run.ledger().requests().to_pandas()
    table = table[table["request_id"].isin(submitted)]
    per_request = table.groupby("request_id").agg(requested=("requested_at", "min"), completed=("completed_at", "max"))
    latency = (per_request["completed"] - per_request["requested"]).dt.total_seconds().tolist()
    span = (per_request["completed"].max() - per_request["requested"].min()).total_seconds()
    receipts = [run.read_json(f"receipts/{rid}.json") for rid in submitted]
    replays = {(shard, entry["new_version"]) for r in receipts for shard, entry in r["shards"].items()}
    touched = sum(len(r["shards"]) for r in receipts)  # (request, shard) pairs
    return {"requests": len(submitted), "requests_per_hour": round(len(submitted) * 3600 / span, 1),
            "p50_seconds": round(_quantile(latency, 0.5), 2), "p99_seconds": round(_quantile(latency, 0.99), 2),
            "max_seconds": round(max(latency), 2), "shard_replays": len(replays),
            "mean_requests_per_replay": round(touched / len(replays), 1),
            "offered_per_hour": rate_per_hour, "submit_lag_p99_seconds": round(_quantile(late, 0.99), 3) if late else 0.0}


def one_at_a_time(run: RunDir, subjects: list[str]) -> dict:
    seconds = []
    for k, subject in enumerate(subjects):
        seconds.append(runs.forget(run, None, subjects=[subject]).seconds)
        log(f"  one at a time {k + 1}/{len(subjects)}: {seconds[-1]:.1f}s")
    return {"requests": len(seconds), "requests_per_hour": round(3600 / statistics.mean(seconds), 1),
            "p50_seconds": round(_quantile(seconds, 0.5), 2), "p99_seconds": round(_quantile(seconds, 0.99), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/fmnist.yaml")
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=10000.0, help="offered requests per hour (Poisson)")
    parser.add_argument("--serial-requests", type=int, default=20, help="requests measured one at a time")
    parser.add_argument("--partitions", default="uniform,by_subject")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    show_messages()  # the verbs' progress on stderr (stdout: one JSON object)
    stdout, sys.stdout = sys.stdout, sys.stderr  # stdout: the one JSON object (Ray forwards worker output to sys.stdout)
    config = config_mod.load(args.config, [f"shards.count={args.shards}", f"shards.slices={args.slices}",
                                           "tracking.enabled=false", *args.overrides])
    cluster.connect(config.ray)
    out: dict = {"benchmark": "deletion_throughput", "dataset": config.data.name, "shards": args.shards,
                 "slices": args.slices, "strategy": config.finetune.strategy, "epsilon": config.privacy.epsilon,
                 "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()}}
    root = Path(tempfile.mkdtemp(prefix="dpsisa-throughput-"))
    for partition in args.partitions.split(","):
        run = RunDir(root / partition)
        log(f"== {partition}: training S={args.shards}, R={args.slices} (kept warm)")
        trained = runs.train(config.with_overrides({"partition.strategy": partition}), run, keep_alive=True)
        chosen = _subjects(run, args.requests + args.serial_requests, config.seed)
        log(f"== {partition}: {args.requests} requests at {args.rate:g}/h, coalesced")
        result = {"full_train_seconds": round(trained["full_train_seconds"], 1),
                  "coalesced": coalesced(run, chosen[: args.requests], args.rate, config.seed)}
        log(f"   {result['coalesced']}")
        log(f"== {partition}: {args.serial_requests} requests one at a time")
        result["one_at_a_time"] = one_at_a_time(run, chosen[args.requests:])
        result["throughput_ratio"] = round(result["coalesced"]["requests_per_hour"]
                                           / result["one_at_a_time"]["requests_per_hour"], 1)
        result["verify_exact"] = runs.verify(run).exact
        runs.stop(run)
        out[partition] = result
    out["note"] = ("2-core CPU machine: the driver, the run's coordinator and S shard actors share the cores; "
                   "a shard replays once for every request waiting for it, from the earliest slice any of them hit.")
    print(json.dumps(out), file=stdout)


if __name__ == "__main__":
    main()
