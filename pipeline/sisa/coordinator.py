"""One writer per run: the coordinator, a detached named Ray actor per run directory.

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
from __future__ import annotations

import fcntl
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import ray
from ray.exceptions import RayActorError, RayTaskError

from pipeline.config import Config
from pipeline.core.checkpoints import CheckpointIntegrityError
from pipeline.sisa import cluster
from pipeline.sisa.driver import Ensemble, OnStage, ShardFailure, StageProgress, actor_name
from pipeline.sisa.erasure_queue import Dispatch, ErasureQueue
from pipeline.sisa.results import ForgetResult
from pipeline.storage import receipts
from pipeline.storage.ledger import ForgetRequestError, new_request_id
from pipeline.storage.rundir import RunDir, RunError

LOG = logging.getLogger("dpsisa.coordinator")
LEASE = "coordinator.lease"
LEASE_TTL_S = 60.0
LEASE_RENEW_S = 15.0
WAIT_POLL_S = 1.0
REPLAY_POLL_S = 0.2  # the worker's wait for shard results while replays run


def cluster_identity() -> str:
    """Unique per Ray cluster start (the GCS session name)."""
    return ray._private.worker.global_worker.node.session_name  # noqa: SLF001 - no public accessor in Ray 2.60


class Lease:
    """Which Ray cluster may write a run. Local disks: an exclusive `flock` held by the holder's
    process (`coordinator.lease.lock`) plus the lease object for error messages. Object storage:
    the lease object alone, {cluster, expires_at}, renewed every LEASE_RENEW_S; an expired lease
    or one of the same cluster (a restarted coordinator) is taken over. Object stores have no
    compare-and-swap here: two clusters starting within the same second could both write it; the
    holder re-reads after writing and gives up if it lost, which narrows but does not close that
    window. Bucket write access should be limited to the cluster anyway (see the README)."""

    def __init__(self, run: RunDir, cluster_id: str):
        self.run, self.cluster_id = run, cluster_id
        self._handle = None

    def holder(self) -> dict | None:
        try:
            return self.run.read_json(LEASE)
        except (FileNotFoundError, ValueError):
            return None

    def _foreign(self) -> dict | None:
        held = self.holder()
        if held is None or held.get("cluster") == self.cluster_id:
            return None
        if not self.run.local and datetime.fromisoformat(held["expires_at"]) < datetime.now(timezone.utc):
            return None  # expired: its cluster is gone
        return held

    def try_acquire(self) -> dict | None:
        """Take the lease; returns None on success, else the foreign holder."""
        if self.run.local:
            if self._handle is None:
                path = Path(self.run.key(LEASE + ".lock"))
                path.parent.mkdir(parents=True, exist_ok=True)
                handle = open(path, "w")  # noqa: SIM115 - held for the coordinator's lifetime
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.close()
                    return self.holder() or {"cluster": "another process"}
                self._handle = handle
            self._write()
            return None
        foreign = self._foreign()
        if foreign is not None:
            return foreign
        self._write()
        held = self.holder()
        return None if held and held.get("cluster") == self.cluster_id else held

    def _write(self) -> None:
        now = datetime.now(timezone.utc)
        self.run.write_json(LEASE, {"cluster": self.cluster_id, "pid": os.getpid(), "renewed_at": now.isoformat(),
                                    "expires_at": (now + timedelta(seconds=LEASE_TTL_S)).isoformat()})

    def acquire(self, wait_s: float, log: Callable = print) -> None:
        """Take the lease, waiting up to `wait_s` for another cluster's; then refuse (RunError)."""
        self._wait(self.try_acquire, wait_s, log)

    def wait_until_free(self, wait_s: float, log: Callable = print) -> None:
        """Wait up to `wait_s` while another cluster holds the run (nothing is taken); then refuse."""
        self._wait(self.probe, wait_s, log)

    def _wait(self, attempt: Callable[[], dict | None], wait_s: float, log: Callable) -> None:
        deadline, told = time.monotonic() + wait_s, False
        while (held := attempt()) is not None:
            if time.monotonic() >= deadline:
                raise RunError(
                    f"run {self.run.uri} is being written by another Ray cluster ({held.get('cluster')}, lease until "
                    f"{held.get('expires_at', 'its process exits')}); refusing to write it from this one. Submit to that "
                    "cluster (ray.address / RAY_ADDRESS) or wait until it is done (ray.lease_wait_s).")
            if not told:
                log(f"run {self.run.uri} is held by another Ray cluster ({held.get('cluster')}); waiting up to {wait_s:g}s")
                told = True
            time.sleep(1.0)

    def probe(self) -> dict | None:
        """The foreign holder if another cluster holds the run now (nothing is taken)."""
        if self.run.local:
            path = Path(self.run.key(LEASE + ".lock"))
            if not path.exists():
                return None
            with open(path) as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(handle, fcntl.LOCK_UN)
                    return None
                except BlockingIOError:
                    return self.holder() or {"cluster": "another process"}
        return self._foreign()

    def release(self) -> None:
        held = self.holder()
        if held is not None and held.get("cluster") == self.cluster_id:
            self.run.delete(LEASE)
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


class Coordinator:
    """The run's single writer (run as a detached named Ray actor; see the module docstring)."""

    def __init__(self, run_uri: str, keep_alive: bool = False):
        """Cheap and never failing (Ray reports constructor errors without their cause): the lease
        and the shard actors are taken by the worker thread, and `attach` reports what failed."""
        self.run = RunDir(run_uri)
        self.config = self.run.config()
        self.keep_alive = keep_alive
        self.lease = Lease(self.run, cluster_identity())
        self.ledger = self.run.ledger()
        self.ensemble: Ensemble | None = None
        self._opened = threading.Event()
        self._open_error: Exception | None = None
        self._lock = threading.Condition()
        self._submit_lock = threading.Lock()
        self._results: dict[str, dict] = {}  # request id → ForgetResult dict (this instance's)
        self._failed: dict[str, tuple[str, str]] = {}  # request id → (error kind, message)
        self._records: dict[str, list[dict]] = {}  # request id → stage records of its replays
        self._wake, self._busy, self._clients, self._closing = True, False, 0, False  # wake: resume what is pending
        self._stale = False
        self._last_contact = time.monotonic()
        self.queue = ErasureQueue()
        self._running: dict = {}  # forget ref → (its Dispatch, its StageProgress)
        self._accepted: dict[str, float] = {}  # request id → when this instance accepted it (accept → done)
        self._waited: set[str] = set()  # request ids some client waits for (it logs them to MLflow)
        threading.Thread(target=self._work, daemon=True, name="dpsisa-coordinator").start()

    def _open(self) -> None:
        """Take the run's lease (waiting for another cluster's), then start the shard actors."""
        try:
            self.lease.acquire(self.config.ray.lease_wait_s, log=self._warn)
            self.ensemble = self._start_ensemble()
            if not self.run.local:
                threading.Thread(target=self._renew, daemon=True, name="dpsisa-lease").start()
        except Exception as exc:  # noqa: BLE001 - reported to every client by attach
            self._open_error = exc
            self.lease.release()
        finally:
            self._opened.set()

    def _ready(self) -> None:
        self._opened.wait()
        if self._open_error is not None:
            raise self._open_error

    def _start_ensemble(self) -> Ensemble:
        recipes = [r.to_dict() for r in self.run.recipes()]
        # The placement group is the coordinator's own (unnamed, not detached): Ray removes it with
        # this process, so a restarted or a later coordinator never finds one that is being removed.
        return Ensemble.start(self.run, self.config, recipes, log=self._log)

    def _replace_ensemble(self) -> None:
        """A shard actor died for good (beyond its restarts): start a fresh ensemble."""
        self.ensemble.shutdown()
        self.ensemble, self._stale = self._start_ensemble(), False

    def _log(self, message: str) -> None:
        """Routine events go to the worker's log (`ray logs`, the dashboard), not to clients."""
        LOG.info("[coordinator %s] %s", self.run.name, message)

    def _warn(self, message: str) -> None:
        """What a client should see (forwarded to its stderr by Ray; stdout is for --json)."""
        print(f"[coordinator {self.run.name}] {message}", file=sys.stderr, flush=True)

    # -- client API -------------------------------------------------------------------------
    def ping(self) -> dict:
        return {"cluster": self.lease.cluster_id, "keep_alive": self.keep_alive, "pid": os.getpid()}

    def attach(self) -> list:
        """Register a client; returns the live shard actor handles (warm: reads go straight to them)."""
        self._last_contact = time.monotonic()
        self._ready()
        with self._lock:
            if self._closing:
                raise _Closing()
            if self._stale and not self._busy:
                self._replace_ensemble()
            self._clients += 1
            return list(self.ensemble.actors)

    def submit(self, request_id: str, ids: list[int], logs: bool = False) -> dict:
        """Record a request durably (validated, in order); a retried submission of the same
        request id is recognised and not recorded twice. `logs`: as for `wait`."""
        self.submit_batch({request_id: ids}, logs)
        return {"request_id": request_id, "status": "pending"}

    def submit_batch(self, requests: dict[str, list[int]], logs: bool = False) -> list[str]:
        """Record several requests at once (one ledger write; all of them or none), so that an
        idle shard sees them together and applies them in one replay."""
        self._last_contact = time.monotonic()
        self._ready()
        if logs:
            self._waited.update(requests)
        with self._submit_lock:
            if self._closing:
                raise _Closing()
            known = self.ledger.request_ids()
            new = {rid: ids for rid, ids in requests.items() if rid not in known}
            if new:
                with self.ledger.locked():
                    for ids in new.values():
                        if not ids:
                            self.ledger.validate(ids)  # an empty request is refused by itself
                    self.ledger.validate([i for ids in new.values() for i in ids])  # all at once: an id in two of them too
                    self.ledger.append_requests(new)
                now = time.time()
                self._accepted.update(dict.fromkeys(new, now))
        self.resume()
        return list(requests)

    def resume(self) -> list[str]:
        """Apply whatever is pending (e.g. left by a crash); returns the pending request ids."""
        with self._lock:
            self._failed.clear()
            self._wake = True
            self._lock.notify_all()
        return sorted(self.ledger.pending())

    def wait(self, request_id: str, timeout_s: float = WAIT_POLL_S, since: int = 0, logs: bool = False) -> dict:
        """Block up to `timeout_s` for `request_id`; returns its status, its batch's stage records
        from `since` on, and the result when done. `logs`: the caller logs the request to MLflow
        (else, done while nobody logs it, it goes to the MLflow backlog)."""
        self._last_contact = time.monotonic()
        if logs:
            self._waited.add(request_id)
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                records = self._records.get(request_id, [])[since:]
                if request_id in self._results:
                    return {"status": "done", "result": self._results[request_id], "records": records}
                if request_id in self._failed:
                    kind, message = self._failed[request_id]
                    return {"status": "failed", "kind": kind, "error": message, "records": records}
                if self._open_error is not None:
                    return {"status": "failed", "kind": "open", "error": str(self._open_error), "records": records}
                if not self._busy and not self._wake and request_id not in self.ledger.pending():
                    done = request_id in self.ledger.request_ids()
                    return {"status": "done" if done else "unknown", "result": None, "records": records}
                remaining = deadline - time.monotonic()
                if remaining <= 0 or records:
                    return {"status": "pending", "records": records}
                self._lock.wait(min(remaining, 0.2))

    def release(self) -> bool:
        """A client is done. Without keep-alive, the last client closes the coordinator (its shard
        actors, placement group and lease go); returns True when the caller should kill it."""
        with self._lock:
            self._clients = max(0, self._clients - 1)
            if self.keep_alive or self._clients or self._busy or self._wake:
                return False  # (a request that failed stays pending in the ledger: the next writer resumes it)
            self._closing = True
        self._close()
        return True

    def stop(self) -> bool:
        """`dpsisa stop`: close now (pending requests stay recorded for the next writer)."""
        with self._lock:
            self._closing = True
        self._close()
        return True

    def _close(self) -> None:
        if self.ensemble is not None:
            self.ensemble.shutdown()
        self.lease.release()

    # -- the single writer ------------------------------------------------------------------
    def _work(self) -> None:
        self._open()
        if self._open_error is not None:
            return
        idle = False
        while True:
            with self._lock:
                while not self._wake and not self._closing and not self._running and self.queue.idle():
                    self._lock.wait(timeout=min(5.0, self.config.ray.idle_close_s / 2))
                    if not self._wake and self._idle_for_good():
                        self._closing = idle = True
                if self._closing:
                    break
                wake, self._wake, self._busy = self._wake, False, True
            try:
                if wake:
                    self._take_pending()
                self._dispatch()
                if self._running:
                    self._collect()
            finally:
                with self._lock:
                    self._busy = bool(self._running) or self._wake or not self.queue.idle()
                    self._lock.notify_all()

        if idle:  # (closed by `release` or `stop` otherwise: the client kills it)
            self._warn(f"idle for {self.config.ray.idle_close_s:g}s without clients: closing (the run's next command "
                       "starts a new one)")
            self._close()
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def _take_pending(self) -> None:
        """Queue what the ledger holds as pending (new submissions, or work a crash left), and let
        shards whose last replay failed try again."""
        if self._stale and not self._running:
            self._replace_ensemble()
        self.queue.unblock()
        now = time.time()
        for rid, ids in self.ledger.pending().items():
            if rid not in self.queue:
                self.queue.add(rid, ids, self.ledger.owners(ids), self._accepted.pop(rid, now))

    def _dispatch(self) -> None:
        """Start a replay on every idle shard that has requests waiting."""
        for dispatch in self.queue.next_dispatches(limit=self.ensemble.parallel):
            self._log(f"shard {dispatch.shard}: replaying for {len(dispatch.requests)} request(s) "
                      f"({len(dispatch.ids)} id(s)): {', '.join(dispatch.requests)}")

            def on_stage(shard: int, record: dict, rids=tuple(dispatch.requests)) -> None:
                with self._lock:
                    for rid in rids:
                        self._records.setdefault(rid, []).append({"shard": shard, **record})
                    self._lock.notify_all()

            ref = self.ensemble.actors[dispatch.shard].forget.remote(dispatch.job, dispatch.ids)
            self._running[ref] = (dispatch, StageProgress(self.ensemble.actors, dispatch.job, on_stage))

    def _collect(self) -> None:
        """Wait a little for replays (answering stage-progress polls meanwhile); handle those done."""
        polls = {}
        for dispatch, progress in self._running.values():
            polls.update({ref: progress for ref in progress.ask({dispatch.shard})})
        done, _ = ray.wait(list(self._running) + list(polls), num_returns=1, timeout=REPLAY_POLL_S)
        for ref in done:
            if ref in polls:
                polls[ref].answer(ref)
                continue
            dispatch, progress = self._running.pop(ref)
            try:
                result = self.ensemble.result(dispatch.shard, ref, "forget")
            except Exception as exc:  # noqa: BLE001 - reported to every waiting client; the requests stay pending
                self._failed_replay(dispatch, exc)
                continue
            progress.report(dispatch.shard, result.get("progress", []))
            self._complete(self.queue.shard_done(dispatch.shard, result))

    def _failed_replay(self, dispatch: Dispatch, exc: Exception) -> None:
        kind = "integrity" if isinstance(exc, CheckpointIntegrityError) else "shard"
        self._warn(f"shard {dispatch.shard} replay failed ({kind}): {exc}")
        self._stale = self._stale or isinstance(exc, ShardFailure)
        with self._lock:
            for rid in self.queue.shard_failed(dispatch.shard):
                self._failed[rid] = (kind, str(exc))

    def _complete(self, rids: list[str]) -> None:
        """Mark requests done (one ledger write), write their receipts, hand clients their results."""
        if not rids:
            return
        applied = {rid: self.queue.complete(rid) for rid in rids}
        with self.ledger.locked():
            self.ledger.mark_done_each({rid: {s: r["version"] for s, r in results.items()}
                                        for rid, (_, results, _, _) in applied.items()})
        receipts.write_each(self.run, self.ledger, {rid: (results, batch) for rid, (_, results, batch, _) in applied.items()},
                            untracked={rid for rid in rids if rid not in self._waited})
        self._waited.difference_update(rids)
        now = time.time()
        with self._lock:
            for rid, (ids, results, batch, accepted_at) in applied.items():
                self._results[rid] = ForgetResult.of(rid, ids, results, now - accepted_at, batch).to_dict()
                self._failed.pop(rid, None)
        self._log(f"done: {', '.join(rids)}")

    def _idle_for_good(self) -> bool:
        """Without keep-alive: no client attached, no work, nobody has called for ray.idle_close_s (a
        client that submitted with --no-wait and left; or a restarted instance whose work is done)."""
        return (not self.keep_alive and not self._clients and not self._busy and not self._closing
                and time.monotonic() - self._last_contact > self.config.ray.idle_close_s)

    def _renew(self) -> None:
        while not self._closing:
            time.sleep(LEASE_RENEW_S)
            if not self._closing and self.lease.try_acquire() is not None:
                self._warn("lost the run's lease to another Ray cluster; stopping work on it")
                with self._lock:
                    self._closing = True


class _Closing(RuntimeError):
    """The coordinator is shutting down; the client starts a new one."""


# -- the client side: used by runs.py -------------------------------------------------------
def _remote():
    return ray.remote(Coordinator)


def find(run: RunDir, config: Config):
    """The run's live coordinator in this cluster, or None."""
    return cluster.named_actor(actor_name(run, "coordinator"), config.ray.namespace)


def ensure(run: RunDir, config: Config, keep_alive: bool = False, log: Callable = print):
    """The run's coordinator, started if none is alive (waiting for another cluster's lease first)."""
    handle = find(run, config)
    if handle is not None:
        return handle
    Lease(run, cluster_identity()).wait_until_free(config.ray.lease_wait_s, log)
    return _remote().options(
        name=actor_name(run, "coordinator"), namespace=config.ray.namespace, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=-1, max_concurrency=64, num_cpus=0,
    ).remote(run.uri, keep_alive)


def _unwrap(exc: Exception) -> Exception:
    """The user-facing error inside a Ray error (bad ids, a refused lease, a damaged checkpoint)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, (ForgetRequestError, RunError, CheckpointIntegrityError, cluster.ClusterError)):
        return cause
    if isinstance(cause, _Closing):
        return cause
    if isinstance(exc, RayActorError) and "_Closing" in str(exc):
        return _Closing()
    return ShardFailure(f"the run's coordinator failed: {cause!r}" if cause else f"the run's coordinator died: {exc}")


class Session:
    """A client's use of the run's coordinator: attach → (submit, wait)* → release."""

    def __init__(self, run: RunDir, config: Config, log: Callable = print, keep_alive: bool = False):
        self.run, self.config, self.log, self.keep_alive = run, config, log, keep_alive
        self.handle, self.actors = None, []

    def __enter__(self) -> Session:
        for _ in range(20):
            self.handle = ensure(self.run, self.config, self.keep_alive, self.log)
            try:
                self.actors = ray.get(self.handle.attach.remote())
                return self
            except RayActorError:
                time.sleep(0.5)  # it closed itself between `find` and `attach`: start a new one
                continue
            except RayTaskError as exc:
                error = _unwrap(exc)
                if not isinstance(error, _Closing):
                    ray.kill(self.handle, no_restart=True)  # it could not open the run: the next command starts afresh
                    self.handle = None
                    raise error from None
                time.sleep(0.5)  # another client is closing it: wait for the name to be free
        raise ShardFailure(f"could not attach to the coordinator of {self.run.uri}")

    def __exit__(self, *exc_info) -> None:
        if self.handle is None:
            return
        try:
            if ray.get(self.handle.release.remote()):
                ray.kill(self.handle, no_restart=True)
        except (RayActorError, RayTaskError):
            pass

    def call(self, method: str, *args):
        try:
            return ray.get(getattr(self.handle, method).remote(*args))
        except (RayActorError, RayTaskError) as exc:
            raise _unwrap(exc) from None

    def submit_batch(self, requests: list[list[int]]) -> list[str]:
        """Record one request per id list, all in one durable write; their ids, at once."""
        request_ids = [new_request_id() for _ in requests]
        self.call("submit_batch", dict(zip(request_ids, requests)))
        return request_ids

    def forget(self, ids: list[int], on_stage: OnStage | None = None) -> ForgetResult:
        """Submit and wait; stage records reach `on_stage` as shards finish them."""
        start = time.perf_counter()
        request_id = new_request_id()
        self.call("submit", request_id, ids, True)
        self.log(f"forget request {request_id}: {len(ids)} id(s) submitted to the run's coordinator")
        return self.wait(request_id, ids, start, on_stage, logs=True)

    def wait(self, request_id: str, ids: list[int], start: float, on_stage: OnStage | None = None,
             logs: bool = False) -> ForgetResult:
        """Follow a request until done (`logs`: this client logs it to MLflow)."""
        seen = 0
        while True:
            answer = self.call("wait", request_id, WAIT_POLL_S, seen, logs)
            seen += len(answer["records"])
            for record in answer["records"]:
                if on_stage is not None:
                    on_stage(record["shard"], {k: v for k, v in record.items() if k != "shard"})
            if answer["status"] == "failed":
                if answer["kind"] == "integrity":
                    raise CheckpointIntegrityError(answer["error"])
                raise ShardFailure(f"{answer['error']} (request {request_id} stays pending; the next command completes it)")
            if answer["status"] == "done":
                result = ForgetResult(**answer["result"]) if answer["result"] else self._from_receipt(request_id, ids)
                result.seconds = time.perf_counter() - start
                return result
            if answer["status"] == "unknown":
                raise ShardFailure(f"the coordinator does not know request {request_id}")

    def _from_receipt(self, request_id: str, ids: list[int]) -> ForgetResult:
        """A request applied by an earlier coordinator instance (it was restarted meanwhile): its receipt says what happened."""
        receipt = receipts.read(self.run, request_id) or {"shards": {}, "batch": [request_id]}
        shards = receipt["shards"]
        return ForgetResult(
            request_id=request_id, ids=len(ids),
            shards_retrained=sorted(int(s) for s, e in shards.items() if e["from_stage"] is not None),
            slices_retrained={s: e["stages_replayed"] for s, e in shards.items()},
            from_stage={s: e["from_stage"] for s, e in shards.items()},
            versions={s: e["new_version"] for s, e in shards.items()}, shard_seconds={}, seconds=0.0,
            batch=receipt["batch"])

    def complete_pending(self, on_stage: OnStage | None = None) -> dict[str, ForgetResult]:
        """Have the coordinator finish requests a crash left pending; wait for them."""
        pending = self.run.ledger().pending()
        if not pending:
            return {}
        self.log(f"completing {len(pending)} pending forget request(s) through the run's coordinator")
        self.call("resume")
        start = time.perf_counter()
        out = {}
        for rid, ids in pending.items():
            out[rid] = self.wait(rid, ids, start, on_stage, logs=True)
            out[rid].completed_pending = True
        return out


def stop(run: RunDir, config: Config) -> int:
    """Stop the run's coordinator (and its shard actors); returns how many actors stopped."""
    handle = find(run, config)
    if handle is None:
        return 0
    try:
        shards = len(ray.get(handle.attach.remote()))
        ray.get(handle.stop.remote())
    except (RayActorError, RayTaskError):
        shards = 0
    ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + 30
    while find(run, config) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    return shards + 1
