from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.storage.ledger import ForgetRequestError, Ledger, parse_ids


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path)
    ids = np.arange(20, dtype=np.int64)
    led.write_assignments({"sample_id": ids, "shard": ids % 2, "slice": (ids // 2) % 3, "label": ids % 10})
    return led


def test_parse_ids_accepts_commas_spaces_and_newlines():
    assert parse_ids("1, 2,3\n4\n") == [1, 2, 3, 4]
    with pytest.raises(ForgetRequestError, match="empty item"):  # a trailing comma is a lost id, not nothing
        parse_ids("1, 2,3\n4,")
    with pytest.raises(ForgetRequestError, match="'x'"):
        parse_ids("1,x")


@pytest.mark.parametrize("ids, problem", [([], "no sample ids"), ([-1], "negative"), ([3, 3], "duplicate"),
                                          ([99], "not in this run")])
def test_invalid_requests_are_rejected_with_the_reason(ledger, ids, problem):
    with pytest.raises(ForgetRequestError, match=problem):
        ledger.validate(ids)
    assert not (Path(ledger.dir) / "requests.parquet").exists()


def test_request_lifecycle_pending_then_done_with_versions(ledger):
    rid = ledger.append_request([4, 5])
    assert ledger.pending() == {rid: [4, 5]}
    with pytest.raises(ForgetRequestError, match="already forgotten or pending"):
        ledger.validate([5])
    ledger.mark_done(rid, {0: 2, 1: 7})
    rows = pq.read_table(Path(ledger.dir) / "requests.parquet").to_pylist()
    assert [(r["sample_id"], r["shard"], r["status"], r["model_version"]) for r in rows] == [(4, 0, "done", 2), (5, 1, "done", 7)]
    assert all(r["completed_at"] >= r["requested_at"] for r in rows)
    assert ledger.forgotten_ids() == {4, 5} and ledger.pending() == {}


def test_owners_route_ids_to_their_shards_and_slices_exclude_forgotten(ledger):
    assert ledger.owners([1, 2, 3]) == {1: [1, 3], 0: [2]}
    slices = ledger.shard_slices(0, exclude={2})
    assert sorted(np.concatenate(slices).tolist()) == [0, 4, 6, 8, 10, 12, 14, 16, 18]


def test_sample_ids_are_seeded_distinct_sorted_training_ids_and_clamped_to_the_ledger(ledger):
    known = set(ledger.assignments()["sample_id"].to_pylist())
    drawn = ledger.sample_ids(5, seed=3)
    assert drawn == ledger.sample_ids(5, seed=3) == sorted(drawn) and len(set(drawn)) == 5 and set(drawn) <= known
    assert drawn != ledger.sample_ids(5, seed=4)
    assert sorted(ledger.sample_ids(10 * len(known), seed=0)) == sorted(known)
