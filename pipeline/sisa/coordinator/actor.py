"""The coordinator actor: the run's single writer (see the package docstring)."""
from __future__ import annotations

import logging
import os
import sys
import threading
import time

import ray

from pipeline.core.checkpoints import CheckpointIntegrityError
from pipeline.sisa.coordinator.lease import LEASE_RENEW_S, Lease, cluster_identity
from pipeline.sisa.driver import Ensemble, ShardFailure, StageProgress
from pipeline.sisa.erasure_queue import Dispatch, ErasureQueue
from pipeline.sisa.results import ForgetResult
from pipeline.storage import receipts
from pipeline.storage.rundir import RunDir

LOG = logging.getLogger("dpsisa.coordinator")
WAIT_POLL_S = 1.0
REPLAY_POLL_S = 0.2  # the worker's wait for shard results while replays run


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
