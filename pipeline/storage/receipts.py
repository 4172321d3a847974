"""Erasure receipts: one JSON object per completed forget request, `RUN_DIR/receipts/REQUEST_ID.json`.

What an auditor asks after an erasure: which samples of which subject(s), which shards replayed
from which stage, the new model versions (the first that exclude the samples), the versions that
saw them and were retired (their checkpoint and data files are deleted by the commit), when it was
requested and done, what privacy the erased person had while the retired versions were live
(`privacy`: the run's privacy unit, ε and δ per person over the releases that saw the samples,
and with unit "sample" the group bound for the erased subject's sample count), and — once
`dpsisa verify` has run — whether retraining from scratch matched.
Written by the run's coordinator (the one forget engine, also in a Tune trial): it writes it
once the shards are clean, before the registry step and before the ledger
marks the request done (a restarted coordinator writes any receipt a crash left missing).
"""
from __future__ import annotations

from datetime import datetime, timezone

from pipeline.fs import Storage

FOLDER = "receipts"
BACKLOG = "mlflow_backlog"  # one marker per request applied while no client waited (forget --no-wait)


def build(ledger_rows: list[dict], shard_results: dict[int, dict], batch: list[str], completed_at=None) -> dict:
    """The receipt of one request from its ledger rows (one per id, `applied` or `done`) and the
    results of the shards that applied its batch; `completed_at`: when it becomes done (default:
    the ledger's time)."""
    first = ledger_rows[0]
    shards: dict[str, dict] = {}
    for row in sorted(ledger_rows, key=lambda r: (r["shard"], r["sample_id"])):
        s = int(row["shard"])
        result = shard_results.get(s, {})
        version = int(row["model_version"]) if row["model_version"] is not None else result.get("version")
        entry = shards.setdefault(str(s), {
            "sample_ids": [], "slices": [], "from_stage": result.get("from_stage"),
            "stages_replayed": result.get("stages_replayed"), "new_version": version,
            "retired_versions": list(range(version)) if version is not None else None})
        entry["sample_ids"].append(int(row["sample_id"]))
        if int(row["slice"]) not in entry["slices"]:
            entry["slices"].append(int(row["slice"]))
    return {
        "request_id": first["request_id"],
        "subjects": sorted({r["subject_id"] for r in ledger_rows if r.get("subject_id") is not None}),
        "sample_ids": sorted(int(r["sample_id"]) for r in ledger_rows),
        "shards": shards,
        "batch": list(batch),
        "requested_at": _iso(first["requested_at"]),
        "applied_at": _iso(max((r["applied_at"] for r in ledger_rows if r.get("applied_at") is not None), default=None)),
        "completed_at": _iso(completed_at if completed_at is not None else max(r["completed_at"] for r in ledger_rows)),
        "verify": None,
    }


def write(run: Storage, ledger, requests: list[str], shard_results: dict[int, dict]) -> list[dict]:
    """Write the receipts of a batch of requests just marked done; returns them."""
    return write_each(run, ledger, {rid: (shard_results, requests) for rid in requests})


def write_each(run: Storage, ledger, applied: dict[str, tuple[dict[int, dict], list[str]]],
               completed_at=None) -> list[dict]:
    """Write the receipts of requests just marked done (request id → (results of the shards that
    applied it, the requests replayed with it)), reading the ledger once; returns them. (Backlog
    markers, `backlog` and `mark_logged`, exist only in runs from before the coordinator released
    to MLflow itself; nothing writes them now, and the next command logs any it finds.)"""
    table = ledger.requests().to_pylist()
    out = []
    for request_id, (shard_results, batch) in applied.items():
        rows = [r for r in table if r["request_id"] == request_id]
        if rows:
            receipt = build(rows, shard_results, batch, completed_at)
            receipt["privacy"] = _privacy(run, ledger, receipt)
            run.write_json(f"{FOLDER}/{request_id}.json", receipt)
            out.append(receipt)
    return out


def _privacy(run: Storage, ledger, receipt: dict) -> dict:
    """The erased person's privacy: ε per person of the releases that saw the samples (the largest
    cumulative ε, over the request's shards, of the version before each new one)."""
    from pipeline.storage.rundir import RunDir

    run = run if isinstance(run, RunDir) else RunDir(run)
    exposure: list[float | None] = []
    for shard, entry in receipt["shards"].items():
        version = entry["new_version"]
        releases = {r["version"]: r for r in run.shard(int(shard)).manifest().releases}
        exposure.append(releases[version - 1]["epsilon_cumulative"] if version and version - 1 in releases else None)
    epsilon = None if not exposure or None in exposure else max(exposure)
    largest = None
    if receipt["subjects"]:
        owners = ledger.assignments()["subject_id"].to_numpy(zero_copy_only=False)
        largest = max(int((owners == s).sum()) for s in receipt["subjects"])
    return run.person_privacy(epsilon, largest or len(receipt["sample_ids"]))


def backlog(run: Storage) -> list[dict]:
    """Receipts of requests applied while no client waited, not yet logged to MLflow."""
    out = []
    for request_id in run.list(BACKLOG):
        receipt = read(run, request_id)
        if receipt is not None:
            out.append(receipt)
    return out


def mark_logged(run: Storage, request_ids: list[str]) -> None:
    for request_id in request_ids:
        run.delete(f"{BACKLOG}/{request_id}")


def read(run: Storage, request_id: str) -> dict | None:
    try:
        return run.read_json(f"{FOLDER}/{request_id}.json")
    except FileNotFoundError:
        return None


def record_verify(run: Storage, results: dict[int, dict]) -> int:
    """Stamp `verify` on every receipt whose shards were all just checked; returns how many."""
    stamped = 0
    checked = {str(s) for s in results}
    now = datetime.now(timezone.utc).isoformat()
    for name in run.list(FOLDER):
        receipt = run.read_json(f"{FOLDER}/{name}")
        if not receipt["shards"] or not set(receipt["shards"]) <= checked:
            continue
        receipt["verify"] = {"exact": all(results[int(s)]["exact"] for s in receipt["shards"]), "verified_at": now,
                             "versions": {s: results[int(s)]["version"] for s in receipt["shards"]}}
        run.write_json(f"{FOLDER}/{name}", receipt)
        stamped += 1
    return stamped


def _iso(value) -> str | None:
    return None if value is None else value.isoformat() if hasattr(value, "isoformat") else str(value)
