"""The coordinator actor: the run's single writer (see the package docstring)."""
from __future__ import annotations

import logging
import os
import sys
import threading
import time

import ray

from pipeline.core.checkpoints import CheckpointIntegrityError
from pipeline.sisa.coordinator.lease import LEASE_RENEW_S, LEASE_TTL_S, Lease, cluster_identity
from pipeline.sisa.coordinator.release import Applied, Backoff, ReleaseObserver, recorded_results, release, write_missing_receipts
from pipeline.sisa.driver import Ensemble, ShardFailure, StageProgress
from pipeline.sisa.erasure_queue import Dispatch, ErasureQueue
from pipeline.sisa.results import ForgetResult
from pipeline.storage.rundir import RunDir

LOG = logging.getLogger("dpsisa.coordinator")
WAIT_POLL_S = 1.0
REPLAY_POLL_S = 0.2  # the worker's wait for shard results while replays run
LEASE_MARGIN_S = 15.0  # a holder whose last renewal is older than TTL − margin stops dispatching and committing
MAX_REPLAY_ATTEMPTS = 5  # a shard whose replay failed this often in a row gives up (clients are told; still pending)
REPLAY_TIMEOUT_S = 900.0  # a replay with no answer this long (its actor cannot be rescheduled) counts as failed


class Coordinator:
    """The run's single writer (run as a detached named Ray actor; see the module docstring)."""

    def __init__(self, run_uri: str, keep_alive: bool = False, observer: ReleaseObserver | None = None):
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
        self._started: dict = {}  # forget ref → when it was dispatched (a replay past REPLAY_TIMEOUT_S has failed)
        self._accepted: dict[str, float] = {}  # request id → when this instance accepted it (accept → done)
        self.observer = observer  # the MLflow side (registry), injected by the verbs layer
        self._applied: dict[str, Applied] = {}  # applied requests waiting for their release (→ done)
        self._error: str | None = None  # what the writer is retrying now (shown to waiting clients), None when healthy
        self._worker_backoff, self._release_backoff = Backoff(), Backoff()
        self._replay_failures: dict[int, int] = {}  # shard → failed replays in a row
        self._renewed_at = time.monotonic()  # last successful lease renewal (object storage)
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
            self._quietly(self.lease.release, "release the run's lease")
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
        """Block up to `timeout_s` for `request_id`; returns its status (`pending`, `applied`, `done`,
        `failed` or `unknown`), its batch's stage records from `since` on, the result when done, and
        what the writer is retrying meanwhile (`error`, None when healthy). `logs`: kept for old clients."""
        self._last_contact = time.monotonic()
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
                if request_id not in self.queue and request_id not in self._applied and not self._busy and not self._wake:
                    try:
                        status = self.ledger.status_of(request_id)
                    except Exception as exc:  # noqa: BLE001 - storage down: the client keeps waiting, told why
                        self._error, status = f"ledger: {exc.__class__.__name__}: {exc}", "pending"
                    if status == "done":
                        return {"status": "done", "result": None, "records": records}
                    if status is None:
                        return {"status": "unknown", "result": None, "records": records}
                    self._wake = True  # recorded but not in hand (left by another writer): take it up
                    self._lock.notify_all()
                remaining = deadline - time.monotonic()
                if remaining <= 0 or records:
                    return {"status": "applied" if request_id in self._applied else "pending", "records": records,
                            "error": None if self._error == "lease" else self._error}
                self._lock.wait(min(remaining, 0.2))

    def release(self) -> bool:
        """A client is done. Without keep-alive, the last client closes the coordinator (its shard
        actors, placement group and lease go); returns True when the caller should kill it."""
        with self._lock:
            self._clients = max(0, self._clients - 1)
            if self.keep_alive or self._clients or self._busy or self._wake or self._has_work():
                return False  # it stays until its requests are done (or idle-closes later)
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
        """Never raises: a lease that cannot be released expires by itself."""
        if self.ensemble is not None:
            self._quietly(self.ensemble.shutdown, "stop the shard actors")
        self._quietly(self.lease.release, "release the run's lease (it expires by itself)")

    def _quietly(self, step, what: str) -> None:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - closing goes on
            self._warn(f"could not {what}: {exc.__class__.__name__}: {exc}")

    def _has_work(self) -> bool:
        """Requests this writer holds that are not done: queued, replaying, or applied (releasing)."""
        return bool(self._running or self._applied or not self.queue.empty())

    # -- the single writer ------------------------------------------------------------------
    def _work(self) -> None:
        self._open()
        if self._open_error is not None:
            return
        self._recover_receipts()
        threading.Thread(target=self._release_loop, daemon=True, name="dpsisa-release").start()
        idle = False
        while True:
            with self._lock:
                while not self._due() and not self._closing and not self._running:
                    self._lock.wait(timeout=min(5.0, self.config.ray.idle_close_s / 2))
                    if not self._due() and self._idle_for_good():
                        self._closing = idle = True
                if self._closing:
                    break
                wake, self._wake, self._busy = self._wake, False, True
            try:
                if wake:
                    self._take_pending()
                if self._may_commit():
                    self._dispatch()
                if self._running:
                    self._collect()
                self._worker_backoff.succeeded()
            except Exception as exc:  # noqa: BLE001 - the writer never dies: report, back off, resync from the ledger
                self._fault("writer", exc, self._worker_backoff)
                self._resync()
            finally:
                with self._lock:
                    self._busy = bool(self._running) or self._wake or not self.queue.idle()
                    self._lock.notify_all()

        if idle:  # (closed by `release` or `stop` otherwise: the client kills it)
            self._warn(f"idle for {self.config.ray.idle_close_s:g}s without clients: closing (the run's next command "
                       "starts a new one)")
            self._close()
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def _due(self) -> bool:
        """Work the worker can do now: a wake-up, requests waiting for an idle shard, or blocked
        shards whose backoff has run out."""
        if (self._wake or not self.queue.idle()) and self._worker_backoff.due():
            return True
        if self.queue.blocked() and self._worker_backoff.due():
            self._wake = True  # retry failed replays by themselves: no command needed
            return True
        return False

    def _fault(self, where: str, exc: Exception, backoff: Backoff) -> None:
        wait = backoff.failed()
        message = f"{where}: {exc.__class__.__name__}: {exc}"
        if message != self._error:
            self._warn(f"{message}; retrying in {wait:g}s (requests stay recorded)")
        LOG.exception("coordinator %s failed; retrying in %ss", where, wait)
        with self._lock:
            self._error = message
            self._wake = True
            self._lock.notify_all()

    def _resync(self) -> None:
        """After a fault: forget the in-memory queue and take it again from the ledger (replays in
        flight finish first; shards are idempotent, so a request applied twice replays once)."""
        for ref in list(self._running):
            try:
                ray.wait([ref], timeout=600)
            except Exception:  # noqa: BLE001 - its shard reports again on the next dispatch
                pass
        self._running.clear()
        self._started.clear()
        self.queue = ErasureQueue()

    def _recover_receipts(self) -> None:
        try:
            missing = write_missing_receipts(self.run, self.ledger)
            if missing:
                self._warn(f"wrote the receipt(s) a crash left missing: {', '.join(missing)}")
        except Exception as exc:  # noqa: BLE001 - retried by the next writer
            self._warn(f"could not check for missing receipts: {exc}")

    def _release_loop(self) -> None:
        """Applied requests → done, all that are waiting in one pass (one registered version per pass)."""
        while True:
            with self._lock:
                while not self._closing and not (self._applied and self._release_backoff.due() and self._may_commit()):
                    self._lock.wait(timeout=1.0)
                if self._closing:
                    return
                batch = dict(self._applied)
            try:
                registered = release(self.run, self.ledger, batch, self.observer) or {}
                now = time.time()
                results = {}
                for rid, item in batch.items():
                    result = ForgetResult.of(rid, item.ids, item.results, now - item.accepted_at, item.batch)
                    result.registered_model = registered.get("registered_model")
                    result.registered_version = registered.get("registered_version")
                    results[rid] = result.to_dict()
            except Exception as exc:  # noqa: BLE001 - they stay applied; retried with backoff (every step is idempotent)
                self._fault("registry/receipts", exc, self._release_backoff)
                continue
            self._release_backoff.succeeded()
            with self._lock:
                self._results.update(results)
                for rid in batch:
                    self._applied.pop(rid, None)
                    self._failed.pop(rid, None)
                self._error = None
                self._lock.notify_all()
            self._log(f"done: {', '.join(batch)}")

    def _may_commit(self) -> bool:
        """Local runs: the file lock is held while the process lives. Object storage: only while the
        last lease renewal is younger than the lease's TTL less a margin."""
        if self.run.local:
            return True
        fresh = time.monotonic() - self._renewed_at < LEASE_TTL_S - LEASE_MARGIN_S
        if not fresh and self._error != "lease":
            self._warn("the run's lease could not be renewed in time: not dispatching or committing until it is")
            self._error = "lease"
        return fresh

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
        left = [rid for rid in self.ledger.applied() if rid not in self._applied]
        if left:  # a previous writer applied them and crashed before their release
            recovered = recorded_results(self.run, self.ledger, left)
            with self._lock:
                self._applied.update(recovered)
                self._lock.notify_all()

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
            self._started[ref] = time.monotonic()

    def _collect(self) -> None:
        """Wait a little for replays (answering stage-progress polls meanwhile); handle those done."""
        polls = {}
        for dispatch, progress in self._running.values():
            polls.update({ref: progress for ref in progress.ask({dispatch.shard})})
        done, _ = ray.wait(list(self._running) + list(polls), num_returns=1, timeout=REPLAY_POLL_S)
        for ref in [r for r in self._running if time.monotonic() - self._started.get(r, time.monotonic()) > REPLAY_TIMEOUT_S]:
            dispatch, _ = self._running.pop(ref)  # an actor that cannot come back (e.g. no room to restart it)
            self._started.pop(ref, None)
            self._failed_replay(dispatch, ShardFailure(f"shard {dispatch.shard} gave no answer within {REPLAY_TIMEOUT_S:g}s"))
        for ref in done:
            if ref not in polls and ref not in self._running:
                continue
            if ref in polls:
                polls[ref].answer(ref)
                continue
            dispatch, progress = self._running.pop(ref)
            self._started.pop(ref, None)
            try:
                result = self.ensemble.result(dispatch.shard, ref, "forget")
            except Exception as exc:  # noqa: BLE001 - reported to every waiting client; the requests stay pending
                self._failed_replay(dispatch, exc)
                continue
            progress.report(dispatch.shard, result.get("progress", []))
            self._complete(self.queue.shard_done(dispatch.shard, result))

    def _failed_replay(self, dispatch: Dispatch, exc: Exception) -> None:
        """The shard's requests wait for it again. A damaged checkpoint, or a shard that failed
        MAX_REPLAY_ATTEMPTS times in a row, gives up (waiting clients are told; the requests stay
        pending for the next command); anything else is retried after a backoff."""
        kind = "integrity" if isinstance(exc, CheckpointIntegrityError) else "shard"
        failures = self._replay_failures[dispatch.shard] = self._replay_failures.get(dispatch.shard, 0) + 1
        self._stale = self._stale or isinstance(exc, ShardFailure)
        rids = self.queue.shard_failed(dispatch.shard)
        if kind == "integrity" or failures >= MAX_REPLAY_ATTEMPTS:
            self._warn(f"shard {dispatch.shard} replay failed ({kind}, {failures} time(s)): {exc}; giving up for now")
            with self._lock:
                for rid in rids:
                    self._failed[rid] = (kind, str(exc))
            return
        self._fault(f"shard {dispatch.shard} replay", exc, self._worker_backoff)

    def _complete(self, rids: list[str]) -> None:
        """Every owning shard committed: mark the requests applied (one ledger write) and hand them
        to the release thread (registry, receipt, done)."""
        if not rids:
            return
        for shard in {s for rid in rids for s in self.queue.owners(rid)}:
            self._replay_failures.pop(shard, None)
        applied = {rid: Applied(*self.queue.complete(rid)) for rid in rids}
        with self.ledger.locked():
            self.ledger.mark_applied_each({rid: {s: r["version"] for s, r in a.results.items()} for rid, a in applied.items()})
        with self._lock:
            self._applied.update(applied)
            self._lock.notify_all()
        self._log(f"applied: {', '.join(rids)}")

    def _idle_for_good(self) -> bool:
        """Without keep-alive: no client attached, no work, nobody has called for ray.idle_close_s (a
        client that submitted with --no-wait and left; or a restarted instance whose work is done)."""
        return (not self.keep_alive and not self._clients and not self._busy and not self._closing and not self._has_work()
                and time.monotonic() - self._last_contact > self.config.ray.idle_close_s)

    def _renew(self) -> None:
        """Keep the lease (object storage). A failed renewal is retried on the next beat; while the
        last success is older than TTL − margin, `_may_commit` holds dispatches and commits back."""
        while not self._closing:
            time.sleep(LEASE_RENEW_S)
            if self._closing:
                return
            try:
                foreign = self.lease.try_acquire()
            except Exception as exc:  # noqa: BLE001 - storage outage: try again next beat
                self._warn(f"could not renew the run's lease ({exc.__class__.__name__}: {exc}); retrying")
                continue
            if foreign is not None:
                self._warn("lost the run's lease to another Ray cluster; stopping work on it")
                with self._lock:
                    self._closing = True
                    self._lock.notify_all()
                return
            self._renewed_at = time.monotonic()
            if self._error == "lease":
                self._error = None


class _Closing(RuntimeError):
    """The coordinator is shutting down; the client starts a new one."""
