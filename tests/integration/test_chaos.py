"""A small seeded run of `bench/chaos.py` (issue 17): requests under faults on a multi-node cluster,
an `s3://` run directory behind a fault proxy and an `mlflow server`; nothing is lost, duplicated,
hung, served from erased data or left loadable in the registry, and the negative controls show that
the checker finds registry erasure switched off and an unfenced stale commit. The full run (≥ 20
faults of every kind) is the bench; its figures are in docs/results.md."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import own_ray_cluster

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_multi_process_cluster_at_a_time")]

BENCH = Path(__file__).resolve().parents[2] / "bench" / "chaos.py"


def _bench():
    spec = importlib.util.spec_from_file_location("dpsisa_chaos_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_small_chaos_run_loses_nothing_serves_nothing_erased_and_its_negative_controls_are_caught():
    own_ray_cluster()  # the bench starts a cluster of its own (a head and two worker nodes)
    chaos = _bench()
    kinds = ("kill_coordinator", "storage_flaky", "kill_shard", "remove_node", "mlflow_down", "stale_commit")
    out = chaos.run_chaos(requests=12, faults=6, seed=5, controls=True, rate_per_s=2.0, kinds=kinds, outage_s=5.0)
    assert sum(out["faults_injected"].values()) >= 5 and len(out["faults_injected"]) >= 5, out["faults_injected"]
    assert out["requests"] == 12, out
    assert {k: out[k] for k in ("lost", "duplicated", "hung_clients", "served_erased",
                                "registry_versions_loadable_with_erased_data", "receipts_missing")} == dict.fromkeys(
        ("lost", "duplicated", "hung_clients", "served_erased", "registry_versions_loadable_with_erased_data",
         "receipts_missing"), 0), out
    assert out["verify_exact"] is True and "committed" not in out["stale_commits"], out  # a fenced stale commit is refused
    controls = out["controls"]  # the checker can fail: what each switch-off breaks is counted
    assert controls["registry_erasure_off"]["registry_versions_loadable_with_erased_data"] > 0, controls
    fenced_off = controls["fencing_off"]
    assert fenced_off["duplicated"] > 0 or fenced_off["verify_exact"] is False, controls
