"""`done` means gone (issue 17), on real Ray, a real sqlite MLflow store and a real Parquet ledger
(digits): a request is done only once no registered model version can serve the erased data, with
no further command; a waiting client never hangs without a bound; a coordinator stuck closing is
replaced; a restarted coordinator writes the receipt a crash left missing."""
from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import pytest

from pipeline.sisa import coordinator
from pipeline.sisa.coordinator.session import RequestTimeout
from pipeline.storage import receipts
from pipeline.storage.rundir import RunDir
from pipeline.tracking import registry
from pipeline.verbs import runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tracked(ray_2cpu, tmp_path_factory):
    """A trained digits run (2 shards × 3 slices, by subject) whose MLflow store is a sqlite file."""
    from pipeline import config as C

    base = tmp_path_factory.mktemp("gone")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    config = C.load("jobs/configs/digits.yaml", [f"tracking.uri={uri}", "partition.strategy=by_subject", "ray.idle_close_s=5"])
    run = RunDir(base / "run")
    runs.train(config, run)
    return run, uri


def _subject(run: RunDir, shard: int, skip: set[str] = frozenset()) -> str:
    table = run.ledger().assignments().to_pandas()
    taken = set(run.ledger().requests().to_pandas()["subject_id"].dropna())
    mine = sorted(set(table[table["shard"] == shard]["subject_id"]) - taken - set(skip))
    return mine[0]


def _until(predicate, timeout_s: float = 180.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_no_wait_request_is_done_only_once_no_registered_version_holds_the_erased_person(tracked):
    import mlflow
    from mlflow import MlflowClient

    run, uri = tracked
    subject = _subject(run, 0)
    rid = runs.submit(run, None, subjects=[subject]).request_id
    seen: list[str] = []

    def done() -> bool:  # no command: only storage reads
        status = run.ledger().status_of(rid)
        if not seen or seen[-1] != status:
            seen.append(status)
        return status == "done"

    _until(done, what=f"request {rid} to be done")
    client = MlflowClient(uri)
    name = registry.model_name(run.config(), run)
    rows = run.ledger().requests().to_pandas()
    mine = rows[rows["request_id"] == rid]
    live = client.get_model_version_by_alias(name, registry.ALIAS)
    shard_versions = json.loads(live.tags["dpsisa.shard_versions"])
    for shard, first_without in zip(mine["shard"], mine["model_version"]):
        assert shard_versions[int(shard)] >= int(first_without)  # @live does not hold the person
    for version in client.search_model_versions(f"name='{name}'"):
        held = json.loads(version.tags.get("dpsisa.shard_versions", "null"))
        if held is not None and any(held[int(s)] < int(v) for s, v in zip(mine["shard"], mine["model_version"])):
            assert version.tags["dpsisa.erased"] == "true" and rid in version.tags["dpsisa.erased_by"]
            with pytest.raises(Exception, match=rid):
                mlflow.pyfunc.load_model(f"models:/{name}/{version.version}")
    assert receipts.read(run, rid) is not None and set(seen) <= {"pending", "applied", "done"}
    example = np.load(run.key(registry.EXAMPLE_FILE))
    assert mlflow.pyfunc.load_model(f"models:/{name}@{registry.ALIAS}").predict(example).shape == (4, 10)


def test_a_waiting_client_gives_up_after_its_timeout_naming_the_request_and_the_request_still_completes(tracked):
    run, _ = tracked
    subject = _subject(run, 1)
    with pytest.raises(RequestTimeout, match=r"request \S+ is not done after 0.5s .*dpsisa request --run-dir .* --wait") as caught:
        runs.forget(run, None, subjects=[subject], timeout_s=0.5)
    assert caught.value.exit_code == 4
    (rid,) = [r for r in run.ledger().request_ids() if r in str(caught.value)]
    _until(lambda: run.ledger().status_of(rid) == "done", what=f"request {rid} to complete without its client")
    assert receipts.read(run, rid)["subjects"] == [subject]


def test_a_coordinator_stuck_closing_is_replaced_by_the_next_client(tracked, ray_2cpu, caplog):
    run, _ = tracked
    config = run.config()
    with coordinator.Session(run, config):
        pass
    handle = coordinator.ensure(run, config)
    ray_2cpu.get(handle.stop.remote())  # it closed, and its closer died before killing it: it answers "closing"
    assert coordinator.find(run, config) is not None
    caplog.set_level(logging.INFO, logger="pipeline")
    with coordinator.Session(run, config) as session:
        assert session.actors  # attached to a fresh coordinator
    assert any("replacing it" in line for line in caplog.messages)


def test_a_restarted_coordinator_writes_the_receipt_a_crash_left_missing(tracked, ray_2cpu):
    run, _ = tracked
    config = run.config()
    done = [r for r in run.ledger().request_ids() if run.ledger().status_of(r) == "done"]
    rid = sorted(done)[0]
    before = receipts.read(run, rid)
    handle = coordinator.find(run, config)
    if handle is not None:
        coordinator.stop(run, config)
    (run.path / receipts.FOLDER / f"{rid}.json").unlink()  # what a crash between `done` and the receipt left
    with coordinator.Session(run, config):
        _until(lambda: receipts.read(run, rid) is not None, timeout_s=60, what="the missing receipt")
    after = receipts.read(run, rid)
    assert after["sample_ids"] == before["sample_ids"] and after["shards"].keys() == before["shards"].keys()
    for shard, entry in after["shards"].items():  # the lineage is the manifest's: the replay that applied it
        assert entry["from_stage"] == before["shards"][shard]["from_stage"] is not None
        assert entry["new_version"] == before["shards"][shard]["new_version"]


def test_concurrent_waiting_clients_of_one_run_each_finish(tracked):
    run, _ = tracked
    subjects = [_subject(run, 0), _subject(run, 1)]
    results: list = [None, None]

    def one(k: int) -> None:
        try:
            results[k] = runs.forget(run, None, subjects=[subjects[k]], timeout_s=240)
        except Exception as exc:  # noqa: BLE001 - asserted below
            results[k] = exc

    threads = [threading.Thread(target=one, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(not isinstance(r, Exception) and r is not None for r in results), results
    assert all(run.ledger().status_of(r.request_id) == "done" for r in results)
    assert all(r.registered_version is not None for r in results)


def test_the_run_records_its_partition_key_and_the_assignment_is_recomputable_from_the_ids_alone(tracked):
    from pipeline.data.keyed import partition_key
    from pipeline.data.subjects import partition_by_subject

    run, _ = tracked
    recorded = run.read_json("partition.json")
    config = run.config()
    assert recorded["scheme"] == "blake2b-keyed-v1" and recorded["strategy"] == "by_subject"
    assert bytes.fromhex(recorded["key"]) == partition_key(config.seed, config.partition.key)
    table = run.ledger().assignments().to_pandas().sort_values("sample_id")
    again = partition_by_subject(table["sample_id"].to_numpy(), table["subject_id"].to_numpy(), config.shards.count,
                                 config.shards.slices, recorded["seed"])
    order = np.argsort(again["sample_id"])
    assert np.array_equal(again["shard"][order], table["shard"].to_numpy())
    assert np.array_equal(again["slice"][order], table["slice"].to_numpy())
