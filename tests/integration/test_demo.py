"""`dpsisa demo`'s story end to end on digits (the steps `make run` shows on Fashion-MNIST): real
Ray, MLflow (sqlite), Parquet ledger."""
from __future__ import annotations

import pytest

from pipeline.cli.demo import demo

pytestmark = pytest.mark.slow


def test_the_demo_erases_a_subject_applies_its_burst_with_one_replay_per_shard_and_verifies_exactly(ray_2cpu, tmp_path, capsys):
    result = demo("jobs/configs/digits.yaml", [], str(tmp_path / "run"))
    forgot, burst, verified = result["forget"], result["burst"], result["verify"]
    (home,) = forgot["shards_retrained"]  # by_subject: one person lives in one shard
    assert len(forgot["receipt"]["subjects"]) == 1 and forgot["receipt"]["sample_ids"]
    shards = sorted({shard for shard, _ in burst["replays"]})
    assert len(burst["requests"]) == 5 and len(shards) == 2 and home in shards
    assert len(burst["replays"]) == 2  # recorded at once: each shard applied its requests in one replay
    assert sorted(len(b) for b in burst["batches"]) == [2, 3]
    assert verified["exact"] is True and verified["shards_checked"] == shards and verified["receipts_verified"] == 6
    assert all(0 < e <= 2.0 for e in result["epsilon"])  # digits.yaml's target ε
    assert result["privacy_unit"] == "subject"  # by_subject: person-level DP by default
    privacy = forgot["receipt"]["privacy"]  # what the erased person had: ε per person of the versions that saw them
    assert privacy["privacy_unit"] == "subject" and 0 < privacy["epsilon_per_person"] <= 2.0 and privacy["group_bound"] is None
    out = capsys.readouterr().out
    assert "dpsisa demo summary" in out and "mlflow ui --backend-store-uri" in out and "dpsisa evaluate --run-dir" in out
