"""Which Ray cluster may write a run: the run's lease (see `Lease`)."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import ray

from pipeline.fs import PreconditionFailed
from pipeline.storage.rundir import RunDir, RunError

logger = logging.getLogger(__name__)

LEASE = "coordinator.lease"
LEASE_TTL_S = 60.0
LEASE_RENEW_S = 15.0


def cluster_identity() -> str:
    """Unique per Ray cluster start (the GCS session name)."""
    return ray._private.worker.global_worker.node.session_name  # noqa: SLF001 - no public accessor in Ray 2.60


class Lease:
    """Which Ray cluster may write a run. Local disks: an exclusive `flock` held by the holder's
    process (`coordinator.lease.lock`) plus the lease object for error messages. Object storage:
    the lease object alone, {cluster, expires_at}, renewed every LEASE_RENEW_S; an expired lease
    or one of the same cluster (a restarted coordinator) is taken over. On S3 taking or renewing
    it is a conditional PUT on the ETag just read (If-None-Match when there is none), so of two
    clusters racing for it one wins; on other object stores the holder re-reads after writing,
    which narrows but does not close that window (see docs/cluster.md)."""

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
        try:
            data, tag = self.run.read_tagged(LEASE)
            held = json.loads(data)
        except (FileNotFoundError, ValueError):
            held, tag = None, None
        if held is not None and held.get("cluster") != self.cluster_id and \
                datetime.fromisoformat(held["expires_at"]) >= datetime.now(timezone.utc):
            return held  # another cluster's, not expired
        try:
            self.run.write_if(LEASE, self._body(), tag)
        except PreconditionFailed:  # someone wrote it since we read it: theirs now
            return self.holder() or {"cluster": "another cluster"}
        held = self.holder()
        return None if held and held.get("cluster") == self.cluster_id else held

    def _body(self) -> bytes:
        now = datetime.now(timezone.utc)
        return json.dumps({"cluster": self.cluster_id, "pid": os.getpid(), "renewed_at": now.isoformat(),
                           "expires_at": (now + timedelta(seconds=LEASE_TTL_S)).isoformat()}, indent=2, sort_keys=True).encode()

    def _write(self) -> None:
        self.run.write_bytes(LEASE, self._body())

    def acquire(self, wait_s: float) -> None:
        """Take the lease, waiting up to `wait_s` for another cluster's; then refuse (RunError)."""
        self._wait(self.try_acquire, wait_s)

    def wait_until_free(self, wait_s: float) -> None:
        """Wait up to `wait_s` while another cluster holds the run (nothing is taken); then refuse."""
        self._wait(self.probe, wait_s)

    def _wait(self, attempt: Callable[[], dict | None], wait_s: float) -> None:
        deadline, told = time.monotonic() + wait_s, False
        while (held := attempt()) is not None:
            if time.monotonic() >= deadline:
                raise RunError(
                    f"run {self.run.uri} is being written by another Ray cluster ({held.get('cluster')}, lease until "
                    f"{held.get('expires_at', 'its process exits')}); refusing to write it from this one. Submit to that "
                    "cluster (ray.address / RAY_ADDRESS) or wait until it is done (ray.lease_wait_s).")
            if not told:
                logger.warning(f"run {self.run.uri} is held by another Ray cluster ({held.get('cluster')}); waiting up to {wait_s:g}s")
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
