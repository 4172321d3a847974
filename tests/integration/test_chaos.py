"""A small seeded run of `bench/chaos.py` (issue 17): a few dozen seconds of single-subject --no-wait
requests on a multi-node Ray cluster, an s3:// run behind a fault-injecting proxy and an MLflow
server, while the coordinator, shard actors, a worker node, the bucket and the tracking store fail.
Nothing may be lost, applied twice, served after it was done, left loadable in the registry or
without a receipt; and the negative controls show the checker catches a registry that does not
erase and a commit that is not fenced."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[2] / "bench" / "chaos.py"


def _bench():
    spec = importlib.util.spec_from_file_location("chaos_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["chaos_bench"] = module
    spec.loader.exec_module(module)
    return module


def test_a_seeded_chaos_run_loses_nothing_serves_nothing_erased_and_its_checker_can_fail():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    result = _bench().run_chaos(requests=8, faults=6, seed=0, controls=True)
    assert result["requests"] == 8 and sum(result["faults_injected"].values()) >= 5 and len(result["faults_injected"]) >= 4
    for count in ("lost", "duplicated", "hung_clients", "served_erased", "registry_versions_loadable_with_erased_data",
                  "receipts_missing"):
        assert result[count] == 0, (count, result)
    assert result["verify_exact"] is True and result["probes"]["predicts"] > 0
    assert all(outcome in ("refused", "skipped (no release to undercut)") for outcome in result["stale_commits"])
    controls = result["controls"]
    assert controls["registry_erasure_off"]["registry_versions_loadable_with_erased_data"] > 0
    fenceless = controls["fencing_off"]
    assert fenceless["stale_commit"] == "committed" and (fenceless["duplicated"] > 0 or not fenceless["verify_exact"])
