import pytest

from pipeline.sisa.erasure_queue import ErasureQueue


def _result(version):
    return {"version": version}


def test_requests_for_a_busy_shard_wait_and_are_coalesced_into_its_next_replay():
    q = ErasureQueue()
    q.add("r1", [1], {0: [1]}, 0.0)
    (first,) = q.next_dispatches()
    assert (first.shard, first.requests, first.ids) == (0, ["r1"], [1])
    q.add("r2", [5, 2], {0: [5, 2]}, 1.0)
    q.add("r3", [3], {0: [3]}, 2.0)
    assert q.next_dispatches() == []  # shard 0 is replaying r1
    assert q.shard_done(0, _result(1)) == ["r1"]
    (second,) = q.next_dispatches()
    assert (second.requests, second.ids, second.job) == (["r2", "r3"], [2, 3, 5], "r2+1")
    assert q.shard_done(0, _result(2)) == ["r2", "r3"]
    ids, applied, batch, accepted = q.complete("r2")
    assert (ids, applied, batch, accepted) == ([5, 2], {0: _result(2)}, ["r2", "r3"], 1.0)


def test_a_request_for_an_idle_shard_does_not_wait_for_a_busy_one():
    q = ErasureQueue()
    q.add("r1", [1], {0: [1]}, 0.0)
    q.next_dispatches()
    q.add("r2", [7], {1: [7]}, 1.0)
    (dispatch,) = q.next_dispatches()
    assert (dispatch.shard, dispatch.requests) == (1, ["r2"])
    assert {d.shard for d in q.running()} == {0, 1}


def test_a_request_spanning_shards_completes_only_when_every_owner_applied_it():
    q = ErasureQueue()
    q.add("r1", [1, 9], {0: [1], 1: [9]}, 0.0)
    assert sorted(d.shard for d in q.next_dispatches()) == [0, 1]
    assert q.shard_done(1, _result(4)) == []
    assert q.shard_done(0, _result(2)) == ["r1"]
    assert q.complete("r1")[1] == {0: _result(2), 1: _result(4)}
    assert q.idle()


def test_a_failed_replay_requeues_its_requests_and_blocks_the_shard_until_unblocked():
    q = ErasureQueue()
    q.add("r1", [1], {0: [1]}, 0.0)
    q.next_dispatches()
    assert q.shard_failed(0) == ["r1"]
    assert q.next_dispatches() == [] and q.idle()  # not retried in a loop
    q.unblock()
    (again,) = q.next_dispatches()
    assert again.requests == ["r1"]


def test_adding_a_queued_request_again_is_ignored_and_a_request_without_owner_is_refused():
    q = ErasureQueue()
    q.add("r1", [1], {0: [1]}, 0.0)
    q.add("r1", [1], {0: [1]}, 5.0)
    assert len(q.next_dispatches()) == 1 and q.next_dispatches() == []
    with pytest.raises(ValueError):
        q.add("r2", [3], {}, 0.0)


def test_with_a_limit_the_shards_whose_requests_waited_longest_replay_first():
    q = ErasureQueue()
    q.add("r1", [9], {2: [9]}, 0.0)
    q.add("r2", [1], {0: [1]}, 1.0)
    q.add("r3", [5], {1: [5]}, 2.0)
    assert [d.shard for d in q.next_dispatches(limit=2)] == [2, 0]
    assert q.next_dispatches(limit=2) == []
    q.shard_done(2, _result(1))
    assert [d.shard for d in q.next_dispatches(limit=2)] == [1]
