"""Per-shard coalescing of forget requests: the coordinator's bookkeeping, without Ray.

Every shard has its own pipeline. A shard that is idle takes every request waiting for it (in the
order they were accepted) and replays once for all of their ids, from the earliest slice any of
them touches; requests that arrive meanwhile wait for its next replay. Shards run independently:
a request for an idle shard never waits for a busy one. A request is complete when every shard
that owns some of its ids has committed a version without them; it is then marked done with,
per shard, the first version that excludes its ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field


def job_name(request_ids: list[str]) -> str:
    """What a replay for these requests is called in shard progress records and logs."""
    return request_ids[0] if len(request_ids) == 1 else f"{request_ids[0]}+{len(request_ids) - 1}"


@dataclass
class _Request:
    ids: list[int]
    owners: dict[int, list[int]]  # shard → the ids of this request it owns
    accepted_at: float
    waiting: set[int] = field(default_factory=set)  # shards it waits for (not dispatched yet)
    applied: dict[int, dict] = field(default_factory=dict)  # shard → the result of the replay that applied it
    batch: dict[str, None] = field(default_factory=dict)  # requests replayed with it (any shard), in acceptance order


@dataclass(frozen=True)
class Dispatch:
    """One replay of one shard, for every request that was waiting for it."""

    shard: int
    requests: list[str]
    ids: list[int]

    @property
    def job(self) -> str:
        return job_name(self.requests)


class ErasureQueue:
    def __init__(self):
        self._requests: dict[str, _Request] = {}  # insertion order = acceptance order
        self._running: dict[int, Dispatch] = {}  # shard → its replay in flight
        self._blocked: set[int] = set()  # shards whose last replay failed: wait for `unblock`

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def add(self, request_id: str, ids: list[int], owners: dict[int, list[int]], accepted_at: float) -> None:
        """Queue a request (ignored if already queued)."""
        if request_id in self._requests:
            return
        if not owners:
            raise ValueError(f"request {request_id} has no owning shard")
        self._requests[request_id] = _Request(list(ids), {s: list(v) for s, v in owners.items()}, accepted_at,
                                              waiting=set(owners))

    def next_dispatches(self, limit: int | None = None) -> list[Dispatch]:
        """A replay for every idle, unblocked shard that has requests waiting (with `limit`, while
        fewer than that many run: the shards whose waiting request is oldest first); they are now running."""
        out = []
        order: list[int] = []  # shards by their oldest waiting request
        for r in self._requests.values():
            order.extend(s for s in sorted(r.waiting) if s not in order)
        for shard in order:
            if shard in self._running or shard in self._blocked:
                continue
            if limit is not None and len(self._running) >= limit:
                break
            rids = [rid for rid, r in self._requests.items() if shard in r.waiting]
            ids = sorted(i for rid in rids for i in self._requests[rid].owners[shard])
            for rid in rids:
                self._requests[rid].waiting.discard(shard)
                self._requests[rid].batch.update(dict.fromkeys(rids))
            dispatch = Dispatch(shard, rids, ids)
            self._running[shard] = dispatch
            out.append(dispatch)
        return out

    def running(self) -> list[Dispatch]:
        return list(self._running.values())

    def shard_done(self, shard: int, result: dict) -> list[str]:
        """The shard committed its replay: returns the requests now complete (every owner applied them)."""
        dispatch = self._running.pop(shard)
        complete = []
        for rid in dispatch.requests:
            request = self._requests[rid]
            request.applied[shard] = result
            if set(request.applied) == set(request.owners):
                complete.append(rid)
        return complete

    def shard_failed(self, shard: int) -> list[str]:
        """The shard's replay failed: its requests wait for it again, and it is blocked until `unblock`
        (so a broken shard is not retried in a loop). Returns the requests that were in the replay."""
        dispatch = self._running.pop(shard)
        for rid in dispatch.requests:
            self._requests[rid].waiting.add(shard)
        self._blocked.add(shard)
        return list(dispatch.requests)

    def unblock(self) -> None:
        self._blocked.clear()

    def complete(self, request_id: str) -> tuple[list[int], dict[int, dict], list[str], float]:
        """Remove a complete request: (its ids, shard → result that applied it, its batch, accepted at)."""
        request = self._requests.pop(request_id)
        return request.ids, dict(request.applied), list(request.batch), request.accepted_at

    def owners(self, request_id: str) -> list[int]:
        """The shards that own some of a queued request's ids."""
        return sorted(self._requests[request_id].owners)

    def empty(self) -> bool:
        """No request queued at all (running, waiting or blocked)."""
        return not self._requests

    def blocked(self) -> bool:
        """Some request waits only for a shard whose last replay failed (retried after `unblock`)."""
        return any(r.waiting and r.waiting <= self._blocked for r in self._requests.values())

    def idle(self) -> bool:
        """Nothing running and nothing that could run now."""
        return not self._running and not any(r.waiting - self._blocked for r in self._requests.values())
