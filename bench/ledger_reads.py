"""How often one forget request reads the request log (`ledger/requests.parquet`), in every
process of the cluster: the client, the run's coordinator and its shard actors (issue 18: "read
whole about a dozen times per request").

Each Ray worker counts its reads through a `worker_process_setup_hook` (bench-side
instrumentation, nothing in the product reads it); the driver counts its own. On a warm digits run
(tracking off, `by_subject`, coordinator kept alive) it sends `--requests` single-subject
forgets: `--mode wait` (`dpsisa forget`, the client waits) or `--mode no-wait` (`forget
--no-wait`, then the ledger is polled by this bench, whose reads are not counted). Prints one
JSON object: reads per request by process kind, and the requests' own count.

  python bench/ledger_reads.py --requests 10
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _count_reads() -> None:
    """In every process: append one line per read of a ledger table to $DPSISA_BENCH_READS/<pid>."""
    import os

    from pipeline.storage import ledger

    if not os.environ.get("DPSISA_BENCH_READS") or getattr(ledger.Ledger._read, "_counted", False):
        return
    original = ledger.Ledger._read

    def counted(self, name, schema=None):
        folder = os.environ["DPSISA_BENCH_READS"]
        if os.path.isdir(folder):  # counting only once the bench says so
            with open(os.path.join(folder, str(os.getpid())), "a") as handle:
                handle.write(f"{name}\t{_role()}\n")
        return original(self, name, schema)

    counted._counted = True
    ledger.Ledger._read = counted


def _role() -> str:
    try:
        import ray

        context = ray.get_runtime_context()
        actor = context.get_actor_name() if context.worker.mode == ray.WORKER_MODE else None
        if actor:
            return "coordinator" if "coordinator" in actor else "actor"
        if context.worker.mode == ray.WORKER_MODE:
            return "shard" if context.get_actor_id() else "task"
    except Exception:  # noqa: BLE001 - not in Ray
        pass
    return "client"


def _tally(folder: Path) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for path in folder.iterdir():
        for line in path.read_text().splitlines():
            name, role = line.split("\t")
            out.setdefault(name, {}).setdefault(role, 0)
            out[name][role] += 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--mode", choices=("wait", "no-wait"), default="wait")
    args = parser.parse_args()
    stdout, sys.stdout = sys.stdout, sys.stderr  # stdout: the one JSON object

    import ray

    from pipeline import config as config_mod
    from pipeline.storage.rundir import RunDir
    from pipeline.verbs import runs

    folder = Path(tempfile.mkdtemp(prefix="dpsisa-reads-"))
    (folder / "off").mkdir()
    os.environ["DPSISA_BENCH_READS"] = str(folder / "off")
    ray.init(num_cpus=2, include_dashboard=False, namespace="dpsisa", configure_logging=False,
             runtime_env={"worker_process_setup_hook": _count_reads, "env_vars": {"DPSISA_BENCH_READS": str(folder / "on")}})
    _count_reads()
    config = config_mod.load(str(ROOT / "jobs/configs/digits.yaml"), ["tracking.enabled=false", "partition.strategy=by_subject"])
    run = RunDir(Path(tempfile.mkdtemp(prefix="dpsisa-reads-run-")) / "run")
    runs.train(config, run, keep_alive=True)
    subjects = sorted(set(run.ledger().assignments()["subject_id"].to_pylist()))[: args.requests]
    runs.forget(run, None, subjects=[subjects[0]])  # warm: the coordinator has read its log once
    (folder / "on").mkdir()
    os.environ["DPSISA_BENCH_READS"] = str(folder / "on")
    started = time.monotonic()
    for subject in subjects[1:]:
        if args.mode == "wait":
            runs.forget(run, None, subjects=[subject])
        else:
            os.environ["DPSISA_BENCH_READS"] = str(folder / "off")
            rid = runs.submit(run, None, subjects=[subject]).request_id
            while run.ledger().status_of(rid) != "done":
                time.sleep(0.2)
            os.environ["DPSISA_BENCH_READS"] = str(folder / "on")
    seconds = time.monotonic() - started
    os.environ["DPSISA_BENCH_READS"] = str(folder / "off")
    runs.stop(run)
    count = len(subjects) - 1
    reads = _tally(folder / "on")
    per_request = {name: {role: round(n / count, 1) for role, n in sorted(roles.items())} for name, roles in reads.items()}
    print(json.dumps({"bench": "ledger_reads", "mode": args.mode, "requests": count,
                      "requests_parquet_reads_per_request": per_request.get("requests.parquet", {}),
                      "requests_parquet_reads_per_request_total": round(sum(reads.get("requests.parquet", {}).values()) / count, 1),
                      "reads_per_request": per_request, "seconds": round(seconds, 1),
                      "machine": f"{os.cpu_count()} CPUs"}), file=stdout)


if __name__ == "__main__":
    main()
