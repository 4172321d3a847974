"""Shards spread over nodes, and a worker node lost in the middle of a forget: a real multi-node
Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head without CPUs and three 1-CPU
worker nodes, each a separate raylet with its own resources), digits."""
from __future__ import annotations

import threading
import time

import pytest
from conftest import own_ray_cluster

from pipeline.storage.rundir import RunDir
from pipeline.verbs import runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def multinode():
    import ray
    from ray.cluster_utils import Cluster

    own_ray_cluster()  # the session's shared cluster goes first (this module needs its own nodes)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(3):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="dpsisa", configure_logging=False)
    yield cluster, ray
    ray.shutdown()
    cluster.shutdown()


def test_shards_spread_over_nodes_and_a_lost_worker_node_does_not_lose_the_request(multinode, tmp_path):
    from pipeline import config as C

    cluster, ray = multinode
    config = C.load("jobs/configs/digits.yaml", ["tracking.enabled=false", "ray.cpus_per_shard=1"])
    run = RunDir(tmp_path / "run")
    runs.train(config, run, keep_alive=True)
    status = runs.status(run).to_dict()  # as `status --json` prints it
    assert all(s["live"] and s["device"] == "cpu" for s in status["shards"])
    nodes = [s["node"] for s in status["shards"]]
    assert len(set(nodes)) == 2, nodes  # one bundle per shard, SPREAD: the two shards on two nodes
    worker = next(n for n in cluster.worker_nodes if n.node_id == nodes[0])

    table = run.ledger().assignments().to_pandas()
    target = int(table[(table["shard"] == 0) & (table["slice"] == 0)]["sample_id"].iloc[0])  # replays all 3 stages
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(_forget(run, target)))
    thread.start()
    deadline = time.monotonic() + 60
    while not run.ledger().pending() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.ledger().pending(), "the request never reached the coordinator"
    cluster.remove_node(worker)  # shard 0's node dies mid-forget: Ray re-places its bundle and restarts it
    thread.join(timeout=240)
    assert outcome and not isinstance(outcome[0], Exception), outcome

    after = runs.status(run).to_dict()
    assert after["pending"] == [] and [r["status"] for r in after["done"]] == ["done"]
    assert after["shards"][0]["version"] == 1 and after["shards"][0]["node"] != worker.node_id
    assert runs.verify(run).exact is True
    runs.stop(run)


def _forget(run: RunDir, target: int):
    try:
        return runs.forget(run, [target])
    except Exception as exc:  # noqa: BLE001 - asserted by the test
        return exc
