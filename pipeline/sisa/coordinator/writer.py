"""The coordinator's threads (mixed into `actor.Coordinator`, whose state they share under its lock):
the worker (take pending requests from the ledger, dispatch one replay per idle shard, collect
results, mark requests applied), the release thread (receipts → registry observer → done) and the
lease renewal (object storage). Every exception is caught, shown to waiting clients once, and
retried with a bounded backoff: no thread dies, nothing waits forever."""
from __future__ import annotations

import logging
import threading
import time

import ray

from pipeline.core.checkpoints import CheckpointIntegrityError
from pipeline.sisa.coordinator.lease import LEASE_RENEW_S, LEASE_TTL_S
from pipeline.sisa.coordinator.release import Applied, Backoff, recorded_results, release, write_missing_receipts
from pipeline.sisa.driver import ShardFailure, StageProgress
from pipeline.sisa.erasure_queue import Dispatch, ErasureQueue
from pipeline.sisa.results import ForgetResult

logger = logging.getLogger(__name__)
REPLAY_POLL_S = 0.2  # the worker's wait for shard results while replays run
LEASE_MARGIN_S = 15.0  # a holder whose last renewal is older than TTL − margin stops dispatching and committing
MAX_REPLAY_ATTEMPTS = 5  # a shard whose replay failed this often in a row gives up (clients are told; still pending)
REPLAY_TIMEOUT_S = 900.0  # a replay with no answer this long (its actor cannot be rescheduled) counts as failed


class Writer:
    """The threads of the run's single writer; `actor.Coordinator` holds the state they use."""

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
        wait = backoff.failed(getattr(exc, "retry_cap_s", None))  # e.g. an unreachable tracking server: probed every 5 s
        message = f"{where}: {exc.__class__.__name__}: {exc}"
        if message != self._error:
            self._warn(f"{message}; retrying in {wait:g}s (requests stay recorded)")
        logger.exception("coordinator %s failed; retrying in %ss", where, wait)
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
        self.ledger.refresh()  # the request log again from storage

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
