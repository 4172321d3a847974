"""A run directory on object storage: a real S3-compatible server (moto) on 127.0.0.1, real Ray,
digits. train → forget → verify (EXACT) → evaluate → status through the CLI on an s3:// URI, a
crash mid-forget that leaves the old version live, and the lease that keeps other clusters out."""
from __future__ import annotations

import json
import re
import uuid

import pyarrow.fs as pafs
import pytest
from faults import kill_shard_while_pending

from pipeline import cli
from pipeline.sisa.coordinator import LEASE, Lease
from pipeline.storage.rundir import RunDir, RunError
from pipeline.verbs import runs
from pipeline.verbs.access import held

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_run(s3_store, ray_2cpu, tmp_path_factory):
    """A digits run trained straight into the bucket; shard actors may not be restarted here, so
    that a crash is final (restarts are tested on local runs and on the multi-node cluster)."""
    import os

    from pipeline import config as C

    home = tmp_path_factory.mktemp("s3home")
    os.environ["DPSISA_HOME"] = str(home)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    uri = f"{s3_store.bucket_uri}/runs/{uuid.uuid4().hex[:8]}"
    # 6 epochs: a replay long enough (seconds) that the crash test's killer lands mid-forget, not after it;
    # with digits.yaml's 2 the replay could commit first under load and the crash never happened
    config = C.load("jobs/configs/digits.yaml", ["ray.max_restarts=0", "train.epochs=6"])
    summary = runs.train(config, uri)
    return RunDir(uri), summary, home


def _objects(run: RunDir) -> set[str]:
    infos = run.fs.get_file_info(pafs.FileSelector(run.root, recursive=True))
    return {i.path[len(run.root) + 1:] for i in infos if i.type == pafs.FileType.File}


def _cli_json(capsys, *argv: str) -> dict:
    cli.main([*argv, "--json", "--quiet"])
    return json.loads(capsys.readouterr().out)


def test_an_s3_run_trains_forgets_verifies_evaluates_and_reports_status_through_the_cli(s3_run, monkeypatch, capsys):
    run, summary, home = s3_run
    monkeypatch.setenv("DPSISA_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    assert summary["accuracy"] > 0.5 and summary["run_dir"] == run.uri
    objects = _objects(run)
    assert {"config.yaml", "recipes.json", "model.json", "pretrained.pt", "train_summary.json", "mlflow.json",
            "ledger/assignments.parquet", "shards/shard_000/manifest.json", "shards/shard_001/data.v0.npz"} <= objects
    assert not (home / "s3:").exists() and not list(home.glob("**/manifest.json"))  # nothing landed on local disk

    table = run.ledger().assignments().to_pandas()
    target = int(table[(table["shard"] == 1) & (table["slice"] == 2)]["sample_id"].iloc[0])
    forgot = _cli_json(capsys, "forget", "--run-dir", run.uri, "--ids", str(target))
    assert forgot["shards_retrained"] == [1] and forgot["from_stage"] == {"1": 2} and forgot["versions"] == {"1": 1}
    objects = _objects(run)
    live = run.shard(1).manifest()  # version 1's files carry its replay's token: fresh names, never overwritten
    assert re.fullmatch(r"stage_2\.v1\.[0-9a-f]{8}\.pt", live.stages[2]["file"])
    assert re.fullmatch(r"data\.v1\.[0-9a-f]{8}\.npz", live.data["file"])
    assert f"shards/shard_001/{live.stages[2]['file']}" in objects and "shards/shard_001/stage_2.v0.pt" not in objects
    assert f"shards/shard_001/{live.data['file']}" in objects and "shards/shard_001/data.v0.npz" not in objects
    ids, _, _ = run.shard(1).load_data(run.shard(1).manifest().data)
    assert target not in set(ids.tolist())  # the erased sample left our copy of the data too

    with held(run.uri):  # one coordinator start (on S3) for the three commands below
        assert _cli_json(capsys, "verify", "--run-dir", run.uri)["exact"] is True
        assert _cli_json(capsys, "evaluate", "--run-dir", run.uri)["accuracy"] > 0.5
        status = _cli_json(capsys, "status", "--run-dir", run.uri)
    assert [s["version"] for s in status["shards"]] == [0, 1] and len(status["done"]) == 1
    assert all(s["node"] and s["device"] == "cpu" for s in status["shards"])
    assert LEASE not in _objects(run)  # the coordinator closed and gave the run back


def test_a_shard_lost_mid_forget_on_s3_is_replaced_and_the_request_completes_with_one_version_and_no_orphans(
        s3_run, monkeypatch):
    run, _, home = s3_run
    monkeypatch.setenv("DPSISA_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    table = run.ledger().assignments().to_pandas()
    target = int(table[(table["shard"] == 0) & (table["slice"] == 0)]["sample_id"].iloc[5])
    before = run.shard(0).manifest()
    killer = kill_shard_while_pending(run, 0)  # shard 0's actor dies mid-forget, before its commit, for good
    result = runs.forget(run, [target], timeout_s=300)  # the coordinator replaces it and retries
    killer.join()
    assert killer.killed.is_set() and result.shards_retrained == [0]
    after = run.shard(0).manifest()
    assert after.version == before.version + 1 and target in after.forgotten and run.ledger().pending() == {}
    assert runs.verify(run).exact is True
    live = {e["file"] for e in after.stages} | {after.data["file"], "manifest.json"}
    assert {o.split("/")[-1] for o in _objects(run) if o.startswith("shards/shard_000/")} == live  # no orphans kept


def test_a_second_cluster_is_refused_while_another_holds_the_s3_run(s3_run, monkeypatch):
    run, _, _ = s3_run
    ours, theirs = Lease(run, "cluster-a"), Lease(run, "cluster-b")
    assert ours.try_acquire() is None
    try:
        assert theirs.try_acquire()["cluster"] == "cluster-a"
        with pytest.raises(RunError, match="being written by another Ray cluster"):
            theirs.acquire(wait_s=0)
        held = run.read_json(LEASE)
        run.write_json(LEASE, {**held, "expires_at": "2000-01-01T00:00:00+00:00"})  # its cluster stopped renewing
        assert theirs.try_acquire() is None and run.read_json(LEASE)["cluster"] == "cluster-b"
    finally:
        theirs.release()
        ours.release()
    assert LEASE not in _objects(run)


def test_concurrent_appends_and_marks_on_an_s3_ledger_lose_nothing(s3_store):
    """The coordinator accepts requests on one thread while its worker marks a batch done on
    another; on object storage (no file lock) the ledger's own lock keeps both writes."""
    import threading

    import numpy as np

    from pipeline.storage.ledger import Ledger

    ledger = Ledger(RunDir(f"{s3_store.bucket_uri}/ledgers/{uuid.uuid4().hex[:8]}"))
    ids = np.arange(40, dtype=np.int64)
    ledger.write_assignments({"sample_id": ids, "shard": ids % 2, "slice": ids % 3, "label": ids % 10})
    with ledger.locked():
        first = ledger.append_request([0, 1])

    def append(k: int) -> None:
        with ledger.locked():
            ledger.append_request([2 + k])

    threads = [threading.Thread(target=append, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    with ledger.locked():  # the worker's mark, while the appends run
        ledger.mark_done(first, {0: 1, 1: 1})
    for t in threads:
        t.join()
    table = ledger.requests().to_pandas()
    assert sorted(table["sample_id"]) == list(range(14)) and table["request_id"].nunique() == 13
    assert table[table["request_id"] == first]["status"].tolist() == ["done", "done"]
