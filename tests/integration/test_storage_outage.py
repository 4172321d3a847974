"""A 20 s object-store outage in the middle of a waiting forget (issue 17): an S3 run directory on
moto behind a TCP proxy the test switches off (production code sees network errors; it carries no
test hook). The coordinator reports the error, backs off and retries; the waiting client prints it
once and finishes once storage is back; the lease survives; verify stays EXACT."""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from datetime import datetime, timezone

import pytest
from conftest import own_ray_cluster
from faults import SwitchableProxy

from pipeline.sisa.coordinator import Lease
from pipeline.storage.rundir import RunDir
from pipeline.verbs import runs

pytestmark = pytest.mark.slow
OUTAGE_S = 20.0


@pytest.fixture(scope="module")
def proxied_run(s3_store, tmp_path_factory):
    """Ray (2 CPUs) whose processes reach the store only through the proxy; a trained digits run there."""
    import ray

    from pipeline import config as C

    proxy = SwitchableProxy("127.0.0.1", int(s3_store.endpoint.rsplit(":", 1)[1]))
    direct = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
    own_ray_cluster()  # the shared cluster's workers reach the store directly: this module needs its own
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="dpsisa", configure_logging=False)
    try:
        home = tmp_path_factory.mktemp("outage")
        config = C.load("jobs/configs/digits.yaml", [f"tracking.uri=sqlite:///{home / 'mlflow.db'}",
                                                     "partition.strategy=by_subject"])
        run = RunDir(f"{s3_store.bucket_uri}/{uuid.uuid4().hex}/run")
        runs.train(config, run)
        yield run, proxy
    finally:
        ray.shutdown()
        os.environ["AWS_ENDPOINT_URL"] = direct
        proxy.close()


def test_a_storage_outage_during_a_waiting_forget_is_retried_and_the_client_finishes(proxied_run, caplog):
    run, proxy = proxied_run
    table = run.ledger().assignments().to_pandas()
    subject = sorted(set(table[table["shard"] == 1]["subject_id"]))[0]
    caplog.set_level(logging.INFO, logger="pipeline")
    outcome: dict = {}

    def client() -> None:
        try:
            outcome["result"] = runs.forget(run, None, subjects=[subject], timeout_s=300)
        except Exception as exc:  # noqa: BLE001 - asserted below
            outcome["error"] = exc

    thread = threading.Thread(target=client)
    thread.start()
    deadline = time.monotonic() + 120
    while not run.ledger().pending() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.ledger().pending(), "the request was never recorded"
    proxy.off()
    time.sleep(OUTAGE_S)
    proxy.on()
    thread.join(timeout=300)
    assert not thread.is_alive(), "the waiting client hung"
    assert "result" in outcome, outcome.get("error")
    rid = outcome["result"].request_id
    assert run.ledger().status_of(rid) == "done" and proxy.refused > 0
    told = [line for line in caplog.messages if "retrying" in line]
    assert told and len(told) == len(set(told))  # the error reached the client, each distinct one once
    held = Lease(run, "").holder()  # released when the coordinator closed, or (if it is still closing) not expired
    assert held is None or datetime.fromisoformat(held["expires_at"]) > datetime.now(timezone.utc)
    assert runs.verify(run).exact is True  # no zombie: the next command just works
