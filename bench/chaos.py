"""Faults under load (issue 17): is `done` still gone, and is nothing lost, while the cluster, the
bucket and the tracking store fail? Prints one JSON object (progress on stderr).

It starts everything it needs itself and points only itself and its children at it (RAY_ADDRESS,
MLFLOW_TRACKING_URI, AWS_*): a `ray.cluster_utils.Cluster` (a head and two worker nodes), moto_server
behind a fault-injecting TCP proxy on 127.0.0.1, and an `mlflow server`. On a digits run in an
`s3://` run directory it sends a bounded Poisson stream of single-subject `forget --no-wait` requests
and, on a seeded schedule, kills the coordinator, kills shard actors, removes a worker node (adding a
fresh one), makes the proxy refuse a fraction of storage connections for a while, stops the MLflow
server for a while, and forces a stale manifest commit. A prober loads `@live` and calls `predict`
every 1.5 s throughout (a serving client with MLflow's HTTP retries bounded as docs/mlflow.md
advises: 3 retries, 20 s per request). At the end, with no fault active, it counts what went wrong (all should be 0):
`lost` (accepted, never done), `duplicated` (an id applied in two releases, or a done id back in a
shard), `hung_clients`, `served_erased` (an `@live` load or a `predict` answer from a version holding a
request that was done before it was asked), `registry_versions_loadable_with_erased_data`,
`receipts_missing`, and `verify_exact`, p50/p99 accept → done.

Negative controls (bench-only switches, not product flags), run after the checks on the same run:
`--controls` then (1) applies one more request through a coordinator given an observer that registers
without erasing, and (2) forces a stale commit with the fence off; the JSON's `controls` shows that
the checker then finds `registry_versions_loadable_with_erased_data` > 0 and `duplicated` > 0 or
`verify_exact` false. Needs the test extras (moto[server]).

  python bench/chaos.py                                   # 30 requests, 8 faults
  python bench/chaos.py --requests 30 --faults 20 --seed 1 --controls
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # moto_server and the proxy come with the test suite

# The prober is a serving client set up as docs/mlflow.md advises: MLflow's HTTP client bounded
# (by default it retries a server that is down 7 times with backoff factor 2, i.e. for minutes).
SERVING_CLIENT = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
KINDS = ("kill_coordinator", "kill_shard", "remove_node", "storage_flaky", "mlflow_down", "stale_commit")


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on a sqlite store in `home`, stoppable and restartable on the same port."""

    def __init__(self, home: Path):
        self.home, self.port, self.proc = home, _free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = str(Path(sys.executable).parent / "mlflow")
        self.proc = subprocess.Popen(
            [exe, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.home / 'mlflow.db'}", "--artifacts-destination", str(self.home / "art")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # up once /health answers (it listens before its app has loaded)
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("mlflow server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a loaded machine: its workers did not finish in time
                os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=30)
            self.proc = None


def done_first_versions(ledger) -> dict[str, dict[int, int]]:
    """Done requests → shard → the first version without their ids (from the ledger)."""
    rows = ledger.requests().to_pandas()
    rows = rows[rows["status"] == "done"]
    out: dict[str, dict[int, int]] = {}
    for rid, shard, version in zip(rows["request_id"], rows["shard"], rows["model_version"]):
        out.setdefault(rid, {})[int(shard)] = int(version)
    return out


def holds(shard_versions, done: dict[str, dict[int, int]]) -> list[str]:
    """The done requests whose data these shard versions still hold."""
    return [rid for rid, first in done.items() if any(shard_versions[s] < v for s, v in first.items())]


class Prober(threading.Thread):
    """Loads @live and calls predict every 1.5 s; counts answers from versions holding done data."""

    def __init__(self, run, name: str, tracking_uri: str, x: np.ndarray):
        super().__init__(daemon=True)
        self.run_dir, self.name, self.uri, self.x = run, name, tracking_uri, x  # not `self.run`: Thread.run
        self.stop_event, self.served_erased, self.loads, self.predicts, self.errors = threading.Event(), 0, 0, 0, 0
        self.hung = 0

    def _bounded(self, fn, timeout_s: float = 120.0, what: str = "call"):
        box: dict = {}
        started = time.monotonic()

        def call():
            try:
                box["value"] = fn()
            except Exception as exc:  # noqa: BLE001 - an unavailable store is not a wrong answer
                box["error"] = exc
            if time.monotonic() - started > timeout_s:
                log(f"prober: the hung {what} ended after {time.monotonic() - started:.0f}s "
                    f"({'error: ' + str(box['error'])[:200] if 'error' in box else 'answered'})")

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            self.hung += 1
            log(f"prober: {what} did not answer within {timeout_s:g}s (counted as a hung client)")
            return None
        if "error" in box:
            self.errors += 1
            return None
        return box["value"]

    def run_once(self) -> None:
        import mlflow
        from mlflow import MlflowClient

        from pipeline.verbs import runs

        done = done_first_versions(self.run_dir.ledger())
        version = self._bounded(lambda: MlflowClient(self.uri).get_model_version_by_alias(self.name, "live"),
                                what="@live lookup")
        if version is not None and self._bounded(lambda: mlflow.pyfunc.load_model(f"models:/{self.name}/{version.version}"),
                                                 what="@live load"):
            self.loads += 1
            self.served_erased += bool(holds(json.loads(version.tags.get("dpsisa.shard_versions", "[]")), done))
        done = done_first_versions(self.run_dir.ledger())
        answer = self._bounded(lambda: runs.serve(self.run_dir, self.x), what="predict")
        if answer is not None:
            self.predicts += 1
            self.served_erased += bool(holds(answer.model_versions, done))

    def run(self) -> None:
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        while not self.stop_event.is_set():
            started = time.monotonic()
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - e.g. the ledger unreadable during a storage fault
                self.errors += 1
            self.stop_event.wait(max(0.0, 1.5 - (time.monotonic() - started)))


def stale_commit(run, shard: int, fenced: bool) -> str:
    """A writer that read the shard's manifest before the last commit and commits now, re-applying
    the ids the last release applied: refused when fenced, else a duplicate application."""
    from pipeline.core.checkpoints import Manifest, StaleCommit

    store = run.shard(shard)
    live, tag = store.manifest_tagged()
    if len(live.releases) < 2:
        return "skipped (no release to undercut)"
    stale = Manifest(**{**live.to_dict(), "version": live.version - 1, "releases": live.releases[:-1]})
    again = live.releases[-1].get("ids", [])
    new = Manifest(shard, live.version + 1, live.stages, sorted(set(live.forgotten) | set(again)),
                   live.releases + [{"version": live.version + 1, "request_id": "stale-writer", "ids": again, "from_stage": 0}],
                   live.data)
    stale_tag = "not-" + tag  # what the stale writer read: an older manifest
    try:
        store.commit(stale, new, expected=stale_tag if fenced else None)
    except StaleCommit:
        return "refused"
    return "committed"


def check(run, name: str, tracking_uri: str, accepted: dict[str, float], verify: str = "always") -> dict:
    """The counts; `verify`: "always", "never" (verify_exact None) or "if_no_duplicates" (a control
    that already shows in `duplicated` needs no retraining to show it)."""
    from mlflow import MlflowClient

    from pipeline.storage import receipts
    from pipeline.verbs import runs

    ledger = run.ledger()
    status = {rid: ledger.status_of(rid) for rid in accepted}
    done = done_first_versions(ledger)
    rows = ledger.requests().to_pandas()
    duplicated = 0
    for shard in range(run.config().shards.count):
        manifest = run.shard(shard).manifest()
        applied = [i for r in manifest.releases[1:] for i in r.get("ids", [])]
        duplicated += len(applied) - len(set(applied))
        mine = rows[(rows["shard"] == shard) & (rows["status"] == "done")]["sample_id"]
        duplicated += int((~mine.isin(manifest.forgotten)).sum())  # a done id back in the shard
    loadable = 0
    client = MlflowClient(tracking_uri)
    for version in client.search_model_versions(f"name='{name}'"):
        held = json.loads(version.tags.get("dpsisa.shard_versions", "null") or "null")
        if held is not None and holds(held, done) and version.tags.get("dpsisa.erased") != "true":
            loadable += 1
    done_rows = rows[rows["status"] == "done"].groupby("request_id")
    seconds = [(g["completed_at"].max() - g["requested_at"].min()).total_seconds() for rid, g in done_rows if rid in accepted]
    verified = verify == "always" or (verify == "if_no_duplicates" and duplicated == 0)
    return {
        "lost": sum(1 for s in status.values() if s != "done"),
        "duplicated": duplicated,
        "registry_versions_loadable_with_erased_data": loadable,
        "receipts_missing": sum(1 for rid, s in status.items() if s == "done" and receipts.read(run, rid) is None),
        "verify_exact": bool(runs.verify(run, all_shards=True).exact) if verified else None,
        "p50_accept_to_done_s": round(float(np.percentile(seconds, 50)), 2) if seconds else None,
        "p99_accept_to_done_s": round(float(np.percentile(seconds, 99)), 2) if seconds else None,
    }


class NoEraseObserver:
    """Negative control: registers a version per batch but never deletes the weights of old ones."""

    def released(self, run, request_ids):
        from pipeline.core.train import ids_digest
        from pipeline.storage.rundir import trained_ids
        from pipeline.tracking import mlflow_runs, registry
        from pipeline.tracking.release import writer_config

        config = writer_config(run)
        registry._erase_superseded = lambda *a, **k: None  # noqa: SLF001 - this process only: the control
        with mlflow_runs.verb_run("forget", config, run, tags={"dpsisa.writer": "control"}) as mlrun:
            ids, _ = trained_ids(run)
            return registry.register_live(config, run, mlrun.run_id, ids_digest(ids), request_ids)


def run_chaos(requests: int, faults: int, seed: int, controls: bool, rate_per_s: float = 0.5,
              kinds: tuple[str, ...] = KINDS, outage_s: float = 15.0) -> dict:
    """One chaos run; `kinds` (cycled through in order) and `outage_s` (how long the store is flaky or
    the tracking server down) let the suite run a small, quick version."""
    import ray
    from faults import SwitchableProxy
    from ray.cluster_utils import Cluster
    from s3_server import moto_s3

    from pipeline import config as config_mod
    from pipeline.sisa import coordinator
    from pipeline.storage.rundir import RunDir
    from pipeline.tracking import registry
    from pipeline.verbs import runs

    rng = random.Random(seed)
    started = time.monotonic()
    home = Path(tempfile.mkdtemp(prefix="dpsisa-chaos-"))
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "DPSISA_HOME", *SERVING_CLIENT)}
    out: dict = {"bench": "chaos", "seed": seed, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    with moto_s3() as store:
        proxy = SwitchableProxy("127.0.0.1", int(store.endpoint.rsplit(":", 1)[1]))
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
        server = MlflowServer(home)
        server.start()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        os.environ.update(RAY_ADDRESS=cluster.address, MLFLOW_TRACKING_URI=server.uri, DPSISA_HOME=str(home))
        prober = None
        try:
            ray.init(address=cluster.address, namespace="dpsisa", configure_logging=False)
            config = config_mod.load(str(ROOT / "jobs/configs/digits.yaml"), [
                f"tracking.uri={server.uri}", "partition.strategy=by_subject", "ray.idle_close_s=600"])
            run = RunDir(f"{store.bucket_uri}/chaos-{uuid.uuid4().hex[:8]}/run")
            log(f"training {run.uri}")
            runs.train(config, run)
            name = registry.model_name(config, run)
            subjects = sorted(set(run.ledger().assignments().to_pandas()["subject_id"]))
            chosen = rng.sample(subjects, min(requests, len(subjects)))
            arrivals = np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate_per_s, len(chosen)))
            span = float(arrivals[-1]) + 10.0
            schedule = sorted((rng.uniform(2.0, span), kinds[k % len(kinds)]) for k in range(faults))
            from pipeline.data import datasets

            os.environ.update(SERVING_CLIENT)  # this process only (the cluster started with MLflow's defaults)
            prober = Prober(run, name, server.uri, datasets.load(config.data).test.x[:8])
            prober.start()
            injected: dict[str, int] = {}
            stale_outcomes: list[str] = []

            def inject(kind: str) -> None:
                injected[kind] = injected.get(kind, 0) + 1
                log(f"fault: {kind}")
                try:
                    if kind == "kill_coordinator":
                        handle = coordinator.find(run, config)
                        if handle is not None:
                            ray.kill(handle, no_restart=False)
                    elif kind == "kill_shard":
                        handle = coordinator.find(run, config)
                        if handle is not None:
                            actors = ray.get(handle.attach.remote(), timeout=60)
                            ray.kill(actors[rng.randrange(len(actors))], no_restart=False)
                            ray.get(handle.release.remote(), timeout=60)
                    elif kind == "remove_node":
                        cluster.remove_node(workers.pop(0))
                        workers.append(cluster.add_node(num_cpus=1))
                    elif kind == "storage_flaky":
                        proxy.flaky(0.3, rng)
                        time.sleep(outage_s)
                        proxy.on()
                    elif kind == "mlflow_down":
                        server.stop()
                        time.sleep(outage_s)
                        server.start()
                    elif kind == "stale_commit":
                        stale_outcomes.append(stale_commit(run, rng.randrange(config.shards.count), fenced=True))
                except Exception as exc:  # noqa: BLE001 - a fault that could not be injected is reported, not fatal
                    log(f"fault {kind} not injected: {exc}")
                    injected[kind] -= 1

            t0 = time.monotonic()
            accepted: dict[str, float] = {}
            hung = [0]

            def submitter() -> None:
                for subject, at in zip(chosen, arrivals):
                    time.sleep(max(0.0, t0 + at - time.monotonic()))
                    box: dict = {}

                    def submit(subject=subject, box=box):
                        try:
                            box["rid"] = runs.submit(run, None, subjects=[subject]).request_id
                        except Exception as exc:  # noqa: BLE001 - refused while storage is down: retried below
                            box["error"] = exc

                    for _attempt in range(20):
                        worker = threading.Thread(target=submit, daemon=True)
                        worker.start()
                        worker.join(180)
                        if worker.is_alive():
                            hung[0] += 1
                            log(f"submit of {subject} did not answer within 180s (counted as a hung client)")
                            break
                        if "rid" in box:
                            accepted[box["rid"]] = time.time()
                            break
                        time.sleep(2.0)

            arrivals_thread = threading.Thread(target=submitter, daemon=True)
            arrivals_thread.start()
            for at, kind in schedule:  # faults in this (the main) thread: removing a node needs it
                time.sleep(max(0.0, t0 + at - time.monotonic()))
                inject(kind)
            arrivals_thread.join()
            log(f"{len(accepted)} requests accepted; waiting for the faults to end")
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                statuses = {run.ledger().status_of(rid) for rid in accepted}
                if statuses <= {"done"}:
                    break
                try:  # a request a lost cluster left behind: the run's next command (this one) finishes it
                    runs.request_status(run, next(iter(r for r in accepted if run.ledger().status_of(r) != "done")),
                                        wait=True, timeout_s=60)
                except Exception:  # noqa: BLE001
                    time.sleep(2)
            prober.stop_event.set()
            prober.join(60)
            out.update({
                "requests": len(accepted), "faults_injected": injected, "stale_commits": stale_outcomes,
                "hung_clients": hung[0] + prober.hung, "served_erased": prober.served_erased,
                "probes": {"live_loads": prober.loads, "predicts": prober.predicts, "unavailable": prober.errors},
                **check(run, name, server.uri, accepted),
            })
            if controls:
                out["controls"] = run_controls(run, config, name, server.uri, accepted)
        finally:
            try:
                if prober is not None:
                    prober.stop_event.set()
                ray.shutdown()
                cluster.shutdown()
                server.stop()
                proxy.close()
            finally:  # the caller's environment comes back even when a shutdown step fails
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
    out["seconds"] = round(time.monotonic() - started, 1)
    return out


def run_controls(run, config, name: str, tracking_uri: str, accepted: dict[str, float]) -> dict:
    """The checker must be able to fail: registry erasure off, then fencing off."""
    from pipeline.sisa import coordinator

    coordinator.stop(run, config)
    table = run.ledger().assignments().to_pandas()
    taken = set(run.ledger().requests().to_pandas()["subject_id"].dropna())
    subject = sorted(set(table["subject_id"]) - taken)[0]
    with coordinator.Session(run, config, keep_alive=True, observer=NoEraseObserver()) as session:
        rid = session.submit_batch([sorted(run.ledger().subjects_to_ids([subject])[subject])])[0]
        session.wait(rid, [], time.perf_counter())
    coordinator.stop(run, config)
    accepted = {**accepted, rid: time.time()}
    erasure_off = check(run, name, tracking_uri, accepted, verify="never")["registry_versions_loadable_with_erased_data"]
    shard = int(run.ledger().requests().to_pandas().query("request_id == @rid")["shard"].iloc[0])
    outcome = stale_commit(run, shard, fenced=False)
    after = check(run, name, tracking_uri, accepted, verify="if_no_duplicates")
    return {"registry_erasure_off": {"registry_versions_loadable_with_erased_data": erasure_off},
            "fencing_off": {"stale_commit": outcome, "duplicated": after["duplicated"], "verify_exact": after["verify_exact"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--faults", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=float, default=0.5, help="mean requests per second (Poisson)")
    parser.add_argument("--controls", action="store_true", help="also run the negative controls (after the checks)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"fault kinds, cycled in this order (of {', '.join(KINDS)})")
    parser.add_argument("--outage-s", type=float, default=15.0, help="how long the store is flaky or MLflow is down")
    args = parser.parse_args()
    stdout, sys.stdout = sys.stdout, sys.stderr  # stdout: the one JSON object (Ray forwards worker output to sys.stdout)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        parser.error(f"unknown fault kind(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(KINDS)}")
    result = run_chaos(args.requests, args.faults, args.seed, args.controls, args.rate, kinds, args.outage_s)
    print(json.dumps(result, default=str), file=stdout)


if __name__ == "__main__":
    main()
