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


def _counting_reads(monkeypatch) -> list[str]:
    reads: list[str] = []
    original = Ledger._read

    def counted(self, name, schema=None):
        reads.append(name)
        return original(self, name, schema)

    monkeypatch.setattr(Ledger, "_read", counted)
    return reads


def test_the_writers_request_log_is_read_once_and_follows_its_own_writes_until_refreshed(ledger, monkeypatch):
    writer = Ledger(ledger.storage.uri.removesuffix("/ledger"), keep_requests=True)
    reads = _counting_reads(monkeypatch)
    first = writer.append_request([1, 2])
    assert writer.pending() == {first: [1, 2]} and writer.status_of(first) == "pending"
    writer.mark_applied_each({first: {0: 1, 1: 1}})
    second = writer.append_request([3])
    assert writer.status_of(first) == "applied" and set(writer.pending()) == {second}
    assert reads.count("requests.parquet") == 1  # read once at start; its own writes keep it current
    assert Ledger(writer.storage.uri.removesuffix("/ledger")).requests().equals(writer.requests())  # what storage holds
    writer.refresh()
    writer.request_ids()
    assert reads.count("requests.parquet") == 3


def test_a_reader_refilling_the_kept_log_during_a_write_never_leaves_it_stale(ledger, monkeypatch):
    """A thread that reads the log from storage while another appends must not put the older table
    back after the newer one was kept: the new request would be unknown to the coordinator."""
    import threading

    writer = Ledger(ledger.storage.uri.removesuffix("/ledger"), keep_requests=True)
    writer.append_request([1])
    writer.refresh()
    reading, release = threading.Event(), threading.Event()
    original = Ledger._read

    def slow(self, name, schema=None):
        table = original(self, name, schema)
        if name == "requests.parquet" and threading.current_thread().name == "reader":
            reading.set()
            release.wait(5)  # holds the older table while the append goes on
        return table

    monkeypatch.setattr(Ledger, "_read", slow)
    reader = threading.Thread(target=writer.request_ids, name="reader")
    reader.start()
    assert reading.wait(5)
    appended: list[str] = []
    appender = threading.Thread(target=lambda: appended.append(writer.append_request([2])))
    appender.start()
    appender.join(0.5)
    release.set()
    reader.join(5)
    appender.join(5)
    assert appended and appended[0] in writer.request_ids()
