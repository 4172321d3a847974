"""The coordinator actor: the run's single writer (see the package docstring). This module holds
its state and the client API (attach, submit, wait, release, stop); `writer.py` the threads that
apply requests (worker), release them (receipts, registry, done) and keep the lease."""
from __future__ import annotations

import logging
import os
import sys
import threading
import time

from pipeline.logs import show as show_messages
from pipeline.sisa.coordinator.lease import Lease, cluster_identity
from pipeline.sisa.coordinator.protocol import Submitted, WaitAnswer
from pipeline.sisa.coordinator.release import Applied, Backoff, ReleaseObserver
from pipeline.sisa.coordinator.writer import Writer
from pipeline.sisa.driver import Ensemble, Placement
from pipeline.sisa.erasure_queue import ErasureQueue
from pipeline.storage.rundir import RunDir

logger = logging.getLogger(__name__)
WAIT_POLL_S = 1.0


class Coordinator(Writer):
    """The run's single writer (run as a detached named Ray actor; see the package docstring): the
    client API here, the worker, release and lease threads in `writer.Writer`."""

    def __init__(self, run_uri: str, keep_alive: bool = False, observer: ReleaseObserver | None = None,
                 placement: Placement | None = None):
        """Cheap and never failing (Ray reports constructor errors without their cause): the lease
        and the shard actors are taken by the worker thread, and `attach` reports what failed.
        `placement`: a Tune trial's placement group, which this coordinator's shards share."""
        self.run = RunDir(run_uri)
        # this process's messages: warnings go to stderr, which Ray forwards to the waiting clients
        show_messages(lambda: sys.stderr, logging.WARNING, prefix=f"[coordinator {self.run.name}] ", alone=True)
        self.placement = placement
        self.config = self.run.config()
        self.keep_alive = keep_alive
        self.lease = Lease(self.run, cluster_identity())
        self.ledger = self.run.ledger(keep_requests=True)  # the run's one writer: its request log in memory
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
            self.lease.acquire(self.config.ray.lease_wait_s)
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
        # Inside a Tune trial the shards take their share of the trial's group instead.
        return Ensemble.start(self.run, self.config, recipes, placement=self.placement)

    def _replace_ensemble(self) -> None:
        """A shard actor died for good (beyond its restarts): start a fresh ensemble."""
        self.ensemble.shutdown()
        self.ensemble, self._stale = self._start_ensemble(), False

    def _log(self, message: str) -> None:
        """Routine events: logged at INFO, which this process does not show (clients do not see them)."""
        logger.info(message)

    def _warn(self, message: str) -> None:
        """What a client should see (forwarded to its stderr by Ray; stdout is for --json)."""
        logger.warning(message)

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

    def submit(self, request_id: str, ids: list[int], logs: bool = False) -> Submitted:
        """Record a request durably (validated, in order); a retried submission of the same
        request id is recognised and not recorded twice. `logs`: as for `wait`."""
        self.submit_batch({request_id: ids}, logs)
        return Submitted(request_id)

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

    def wait(self, request_id: str, timeout_s: float = WAIT_POLL_S, since: int = 0, logs: bool = False) -> WaitAnswer:
        """Block up to `timeout_s` for `request_id`; returns its status (`pending`, `applied`, `done`,
        `failed` or `unknown`), its batch's stage records from `since` on, the result when done, and
        what the writer is retrying meanwhile (`error`, None when healthy). `logs`: kept for old clients."""
        self._last_contact = time.monotonic()
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                records = self._records.get(request_id, [])[since:]
                if request_id in self._results:
                    return WaitAnswer("done", records, result=self._results[request_id])
                if request_id in self._failed:
                    kind, message = self._failed[request_id]
                    return WaitAnswer("failed", records, error=message, kind=kind)
                if self._open_error is not None:
                    return WaitAnswer("failed", records, error=str(self._open_error), kind="open")
                if request_id not in self.queue and request_id not in self._applied and not self._busy and not self._wake:
                    try:
                        status = self.ledger.status_of(request_id)
                    except Exception as exc:  # noqa: BLE001 - storage down: the client keeps waiting, told why
                        self._error, status = f"ledger: {exc.__class__.__name__}: {exc}", "pending"
                    if status == "done":
                        return WaitAnswer("done", records)
                    if status is None:
                        return WaitAnswer("unknown", records)
                    self._wake = True  # recorded but not in hand (left by another writer): take it up
                    self._lock.notify_all()
                remaining = deadline - time.monotonic()
                if remaining <= 0 or records:
                    return WaitAnswer("applied" if request_id in self._applied else "pending", records,
                                      error=None if self._error == "lease" else self._error)
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


class _Closing(RuntimeError):
    """The coordinator is shutting down; the client starts a new one."""
