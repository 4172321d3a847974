"""The last step of a forget request: `applied` → `done`.

A request is `applied` once every shard owning its ids has committed a version without them. It
becomes `done` only after the run's writer has (1) written its receipt, (2) told the release
observer (the MLflow side, injected by the verbs layer: it registers one new model version for
the whole batch, moves `@live` and deletes the weights of every registered version that held the
ids) and (3) marked it done in the ledger. A failure anywhere leaves it `applied`, and the writer
retries with backoff; every step is idempotent, so a crash between them is harmless.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol

from pipeline.storage import receipts
from pipeline.storage.ledger import Ledger
from pipeline.storage.rundir import RunDir

BACKOFF_MIN_S, BACKOFF_MAX_S = 1.0, 30.0


class ReleaseObserver(Protocol):
    """What the run's writer tells the outside world (MLflow) about applied requests. Raising keeps
    them `applied` (retried with backoff); the return value (e.g. the registered model and version)
    reaches the requests' results."""

    def released(self, run: RunDir, request_ids: list[str]) -> dict | None: ...


@dataclass
class Applied:
    """An applied request waiting for its release: its ids, shard → the result of the replay that
    applied it, the requests replayed with it, when this writer accepted it."""

    ids: list[int]
    results: dict[int, dict]
    batch: list[str]
    accepted_at: float


class Backoff:
    """Bounded exponential backoff: 1 s, 2 s, 4 s … 30 s, reset by a success."""

    def __init__(self, low: float = BACKOFF_MIN_S, high: float = BACKOFF_MAX_S):
        self.low, self.high, self.delay, self.until = low, high, low, 0.0

    def failed(self, cap: float | None = None) -> float:
        """The wait before the next try; `cap` bounds it (and the next ones until a success) for
        errors whose retry is cheap (`RecoverableError.retry_cap_s`)."""
        high = self.high if cap is None else min(self.high, cap)
        wait, self.delay = min(self.delay, high), min(high, self.delay * 2)
        self.until = time.monotonic() + wait
        return wait

    def succeeded(self) -> None:
        self.delay, self.until = self.low, 0.0

    def due(self) -> bool:
        return time.monotonic() >= self.until


def recorded_results(run: RunDir, ledger: Ledger, request_ids: list[str]) -> dict[str, Applied]:
    """Applied requests a previous writer left (it crashed before their release): what each owning
    shard's manifest records of the replay that applied them (their lineage survives the crash)."""
    rows = ledger.requests().to_pylist()
    out: dict[str, Applied] = {}
    manifests: dict[int, object] = {}
    for rid in request_ids:
        mine = [r for r in rows if r["request_id"] == rid]
        results = {}
        for shard in sorted({int(r["shard"]) for r in mine}):
            manifest = manifests.setdefault(shard, run.shard(shard).manifest())
            ids = [int(r["sample_id"]) for r in mine if int(r["shard"]) == shard]
            release = manifest.release_without(ids)
            version = release["version"] if release else next(int(r["model_version"]) for r in mine if int(r["shard"]) == shard)
            first = release["from_stage"] if release else None
            results[shard] = {"shard": shard, "version": version, "from_stage": first, "already_applied": True,
                              "stages_replayed": 0 if first is None else len(manifest.stages) - first, "seconds": 0.0}
        out[rid] = Applied([int(r["sample_id"]) for r in mine], results, [rid], time.time())
    return out


def release(run: RunDir, ledger: Ledger, applied: dict[str, Applied], observer: ReleaseObserver | None) -> dict | None:
    """Receipts, then the observer (registry), then `done` in the ledger: one pass for a batch of
    applied requests. Raises (the requests stay applied) if any step fails."""
    at = datetime.now(timezone.utc)
    receipts.write_each(run, ledger, {rid: (a.results, a.batch) for rid, a in applied.items()}, completed_at=at)
    registered = observer.released(run, list(applied)) if observer is not None else None
    with ledger.locked():
        ledger.mark_done_at(list(applied), at)
    return registered


def missing_receipts(run: RunDir, ledger: Ledger) -> list[str]:
    """Done requests without a receipt (a writer from before receipts came first crashed in between)."""
    done = {r["request_id"] for r in ledger.requests().to_pylist() if r["status"] == "done"}
    have = {name.removesuffix(".json") for name in run.list(receipts.FOLDER)}
    return sorted(done - have)


def write_missing_receipts(run: RunDir, ledger: Ledger) -> list[str]:
    """Write the receipt of every done request that has none, from the ledger and the manifests."""
    missing = missing_receipts(run, ledger)
    if missing:
        recovered = recorded_results(run, ledger, missing)
        receipts.write_each(run, ledger, {rid: (a.results, a.batch) for rid, a in recovered.items()})
    return missing
