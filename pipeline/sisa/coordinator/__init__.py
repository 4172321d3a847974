"""One writer per run: the coordinator, a detached named Ray actor per run directory.

`lease` (which cluster may write), `actor` (its state and client API), `writer` (the worker,
release and lease threads), `release` (receipts → registry observer → done), `session` (the
client side). The one forget engine: inside a Tune trial too (not detached, in the trial's
placement group).

Every forget request for a run goes through its coordinator. `submit` validates the ids and
appends the request to the ledger as `pending` (durably) under one lock, so concurrent
submissions are accepted in order and an id already pending or done is refused with the request
that holds it. A worker thread runs one pipeline per shard (`erasure_queue.ErasureQueue`): an
idle shard replays once for every request waiting for it, requests that arrive while it replays
wait for its next replay, and shards never wait for each other. A request is marked done (one
ledger write for all that complete together, then their receipts) when every shard owning its ids
has committed a version without them; `wait` lets any number of clients follow their request.
Nobody else replays a request: a request a live coordinator is working on is never "pending" to
anyone but it.

Fault tolerance: the coordinator is created with `max_restarts=-1, max_task_retries=-1`. Killed
mid-request, Ray restarts it; the new instance finds the request pending in the ledger and
applies it (shards are idempotent: one that committed already skips), and the clients' retried
`wait` calls return when it is done. Its shard actors are restartable too (`driver.spawn_shards`).

Across Ray clusters a named actor cannot be seen, so the coordinator holds the run's lease while
it lives (`Lease`): on a local disk an exclusive file lock (freed by the kernel when the process
dies), on object storage an object naming the owning cluster with an expiry it keeps renewing.
A second cluster waits up to `ray.lease_wait_s` for it, then is refused with a clear error.
"""
from pipeline.sisa.coordinator.actor import Coordinator
from pipeline.sisa.coordinator.lease import LEASE, LEASE_RENEW_S, LEASE_TTL_S, Lease, cluster_identity
from pipeline.sisa.coordinator.session import Session, ensure, find, stop
from pipeline.sisa.driver import actor_name

__all__ = ["LEASE", "LEASE_RENEW_S", "LEASE_TTL_S", "Coordinator", "Lease", "Session", "actor_name", "cluster_identity", "ensure",
           "find", "stop"]
