"""The auditable ledger (Parquet): where each private sample lives, and every forget request.

`RUN_DIR/ledger/assignments.parquet`: one row per private sample — sample_id (int64), shard,
slice, label, subject_id (the data subject who owns it). `RUN_DIR/ledger/requests.parquet`: one
row per id per request — request_id, sample_id, shard, slice, status (pending | done),
requested_at, completed_at, model_version (the owning shard's version that no longer saw the id),
subject_id. Runs written before subjects existed have no subject_id columns (read as null). Each table is one object written whole
(atomically: rename locally, one PUT on object stores), so a crash never leaves a torn file.
Writers are serialised by the run's coordinator (one per run, see `coordinator.py`) and, on a
local disk, also by a file lock across processes.
"""
from __future__ import annotations

import io
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.id_lists import ForgetRequestError, parse_ids, split_items  # noqa: F401  (ledger.X kept for callers)
from pipeline.fs import Storage

REQUEST_SCHEMA = pa.schema([
    ("request_id", pa.string()),
    ("sample_id", pa.int64()),
    ("shard", pa.int32()),
    ("slice", pa.int32()),
    ("status", pa.string()),
    ("requested_at", pa.timestamp("us", tz="UTC")),
    ("completed_at", pa.timestamp("us", tz="UTC")),
    ("model_version", pa.int32()),
    ("subject_id", pa.string()),
    ("applied_at", pa.timestamp("us", tz="UTC")),  # every owning shard committed a version without the id
])
STATUSES = ("pending", "applied", "done")  # recorded → shards clean (registry pending) → gone everywhere


ASSIGNMENTS, REQUESTS = "assignments.parquet", "requests.parquet"
_THREAD_LOCKS: dict[str, threading.RLock] = {}  # per ledger location, for the threads of this process


def new_request_id() -> str:
    """Sortable by time, unique: 20261126T071502-1a2b3c4d."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


class Ledger:
    def __init__(self, run_dir: Storage | Path | str, keep_requests: bool = False):
        """`keep_requests`: keep the request log in memory (read once, then updated by this
        instance's own writes). Only for the run's one writer, its coordinator, which no other
        process writes behind; after a fault it calls `refresh()` to read it again."""
        self.storage = (run_dir if isinstance(run_dir, Storage) else Storage(run_dir)).sub("ledger")
        self._assignments: pa.Table | None = None
        self._keep_requests, self._requests = keep_requests, None

    def refresh(self) -> None:
        """Forget the request log kept in memory: the next read takes it from storage."""
        self._requests = None

    @property
    def dir(self) -> str:
        return self.storage.uri

    def _write(self, name: str, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        if name != REQUESTS:
            self.storage.write_bytes(name, buffer.getvalue())
            return
        with self._thread_lock():  # no reader refills the kept log from storage while it changes
            self._requests = None  # a failed write may still have landed: read it again next time
            self.storage.write_bytes(name, buffer.getvalue())
            if self._keep_requests:
                self._requests = table

    def _read(self, name: str, schema: pa.Schema | None = None) -> pa.Table:
        return pq.read_table(io.BytesIO(self.storage.read_bytes(name)), schema=schema)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise read-modify-write of the requests table: between threads of one process (the
        coordinator accepts requests while its worker marks a batch done), and across processes on
        a local disk (a file lock). On object storage the run's coordinator is the only writing
        process and its lease keeps other clusters out."""
        with self._thread_lock(), self.storage.file_lock(".lock"):
            yield

    # -- assignments --------------------------------------------------------------------------
    def write_assignments(self, columns: dict[str, np.ndarray]) -> None:
        table = pa.table({
            "sample_id": pa.array(columns["sample_id"], pa.int64()),
            "shard": pa.array(columns["shard"], pa.int32()),
            "slice": pa.array(columns["slice"], pa.int32()),
            "label": pa.array(columns["label"], pa.int32()),
            **({"subject_id": pa.array(columns["subject_id"], pa.string())} if "subject_id" in columns else {}),
        })
        self._write(ASSIGNMENTS, table)
        self._assignments = table

    def assignments(self) -> pa.Table:
        if self._assignments is None:
            try:
                self._assignments = self._read(ASSIGNMENTS)
            except FileNotFoundError:
                raise FileNotFoundError(f"no ledger at {self.dir}/{ASSIGNMENTS}; is this a run directory made by "
                                        "`dpsisa train`?") from None
        return self._assignments

    def largest_subject(self) -> int | None:
        """How many samples the largest data subject owns (None: the run has no subjects)."""
        table = self.assignments()
        if "subject_id" not in table.column_names or table["subject_id"].null_count == table.num_rows:
            return None
        counts = pa.compute.value_counts(table["subject_id"].drop_null())
        return int(pa.compute.max(counts.field("counts")).as_py())

    def sample_ids(self, count: int, seed: int) -> list[int]:
        """Up to `count` distinct training ids drawn with `seed` (the same ids on a rerun), sorted."""
        ids = self.assignments()["sample_id"].to_numpy()
        return sorted(np.random.default_rng(seed).choice(ids, size=min(count, len(ids)), replace=False).tolist())

    def shard_slices(self, shard: int, exclude: set[int] | frozenset[int] = frozenset()) -> list[np.ndarray]:
        """Ids of each slice of `shard`, in ledger order, without `exclude`."""
        table = self.assignments()
        mask = table["shard"].to_numpy() == shard
        ids, slices = table["sample_id"].to_numpy()[mask], table["slice"].to_numpy()[mask]
        keep = ~np.isin(ids, np.fromiter(exclude, np.int64, len(exclude)))
        return [ids[(slices == r) & keep] for r in range(int(slices.max()) + 1)]

    # -- requests -----------------------------------------------------------------------------
    def _thread_lock(self) -> threading.RLock:
        return _THREAD_LOCKS.setdefault(self.storage.uri, threading.RLock())

    def requests(self) -> pa.Table:
        kept = self._requests
        if kept is not None:
            return kept
        if not self._keep_requests:
            return self._read_requests()
        with self._thread_lock():  # filled while no write is under way (writes hold this lock)
            if self._requests is None:
                self._requests = self._read_requests()
            return self._requests

    def _read_requests(self) -> pa.Table:
        try:
            table = self._read(REQUESTS)
        except FileNotFoundError:
            table = REQUEST_SCHEMA.empty_table()
        for name in REQUEST_SCHEMA.names:  # a ledger from before a column existed: nulls
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(table.num_rows, REQUEST_SCHEMA.field(name).type))
        return table.select(REQUEST_SCHEMA.names).cast(REQUEST_SCHEMA)

    def forgotten_ids(self, status: str | tuple[str, ...] | None = ("applied", "done")) -> set[int]:
        """Ids of requests in `status` (default: every request whose shards no longer hold its ids)."""
        table = self.requests()
        if status is not None:
            wanted = (status,) if isinstance(status, str) else status
            table = table.filter(pa.compute.is_in(table["status"], value_set=pa.array(list(wanted), pa.string())))
        return set(table["sample_id"].to_pylist())

    def applied(self) -> dict[str, list[int]]:
        """request_id → ids of every request whose shards are clean but that is not done yet
        (its registry step and receipt are still to come)."""
        return self._with_status("applied")

    def status_of(self, request_id: str) -> str | None:
        """A request's status: the least advanced of its ids' (None: no such request)."""
        table = self.requests()
        statuses = {st for rid, st in zip(table["request_id"].to_pylist(), table["status"].to_pylist()) if rid == request_id}
        return next((st for st in STATUSES if st in statuses), None)

    def _with_status(self, *wanted: str) -> dict[str, list[int]]:
        table = self.requests()
        out: dict[str, list[int]] = {}
        for rid, sid, status in zip(table["request_id"].to_pylist(), table["sample_id"].to_pylist(), table["status"].to_pylist()):
            if status in wanted:
                out.setdefault(rid, []).append(sid)
        return out

    def unfinished(self) -> dict[str, list[int]]:
        """request_id → ids of every request not yet done (pending or applied), from one read."""
        return self._with_status("pending", "applied")

    def pending(self) -> dict[str, list[int]]:
        """request_id → ids of every request recorded but not yet applied by its shards."""
        return self._with_status("pending")

    def holders(self, ids: list[int]) -> dict[int, tuple[str, str]]:
        """id → (request_id, status) of the request that already holds it, for each given id that one does; sorted by id."""
        table = self.requests()
        table = table.filter(pa.compute.is_in(table["sample_id"], value_set=pa.array(ids, pa.int64())))
        out: dict[int, tuple[str, str]] = {}
        for sid, rid, status in zip(table["sample_id"].to_pylist(), table["request_id"].to_pylist(), table["status"].to_pylist()):
            out[sid] = (rid, status)  # the latest request wins (there is one: validate refuses a second)
        return dict(sorted(out.items()))

    def validate(self, ids: list[int]) -> None:
        """Raise ForgetRequestError naming every problem; the ledger is not touched."""
        if not ids:
            raise ForgetRequestError("no sample ids given; pass --ids 12,907 or --ids-file FILE.")
        arr = np.asarray(ids, dtype=np.int64)
        problems = []
        negative = arr[arr < 0]
        if len(negative):
            problems.append(f"negative ids {negative[:10].tolist()}")
        values, counts = np.unique(arr, return_counts=True)
        if (counts > 1).any():
            problems.append(f"duplicate ids {values[counts > 1][:10].tolist()}")
        known = self.assignments()["sample_id"].to_numpy()
        unknown = values[(values >= 0) & ~np.isin(values, known)]
        if len(unknown):
            problems.append(f"ids not in this run's private training set {unknown[:10].tolist()}")
        held = self.holders(values.tolist())
        if held:  # a retrying script can tell "already requested" from "bad id" by the request id
            named = ", ".join(f"{sid} (request {rid} {status})" for sid, (rid, status) in list(held.items())[:10])
            more = f" and {len(held) - 10} more" if len(held) > 10 else ""
            problems.append(f"ids already forgotten or pending: {named}{more}")
        if problems:
            raise ForgetRequestError("forget request rejected, nothing changed: " + "; ".join(problems) + ".")

    def append_request(self, ids: list[int], request_id: str | None = None) -> str:
        """Record a request as `pending` (durably) before any work starts; returns its id
        (`request_id`, when the client chose one so that a retried submission is recognised)."""
        request_id = request_id or new_request_id()
        self.append_requests({request_id: ids})
        return request_id

    def append_requests(self, requests: dict[str, list[int]]) -> None:
        """Record several requests (request id → its ids) as `pending` in one durable write."""
        table = self.assignments()
        known = table["sample_id"].to_numpy()
        order = np.argsort(known)
        ids = [i for owned in requests.values() for i in owned]
        rows = order[np.searchsorted(known, np.asarray(ids, np.int64), sorter=order)]
        now = datetime.now(timezone.utc)
        new = pa.table({
            "request_id": [rid for rid, owned in requests.items() for _ in owned],
            "sample_id": pa.array(ids, pa.int64()),
            "shard": table["shard"].take(rows).cast(pa.int32()),
            "slice": table["slice"].take(rows).cast(pa.int32()),
            "status": ["pending"] * len(ids),
            "requested_at": pa.array([now] * len(ids), pa.timestamp("us", tz="UTC")),
            "completed_at": pa.nulls(len(ids), pa.timestamp("us", tz="UTC")),
            "model_version": pa.nulls(len(ids), pa.int32()),
            "subject_id": (table["subject_id"].take(rows) if "subject_id" in table.column_names
                           else pa.nulls(len(ids), pa.string())),
            "applied_at": pa.nulls(len(ids), pa.timestamp("us", tz="UTC")),
        }, schema=REQUEST_SCHEMA)
        self._write(REQUESTS, pa.concat_tables([self.requests(), new]))

    def request_ids(self) -> set[str]:
        return set(self.requests()["request_id"].to_pylist())

    def mark_done(self, request_id: str | list[str], versions: dict[int, int]) -> None:
        """Mark a request (or a batch of them, in one write) `done`, stamping each id with its
        shard's new model version."""
        wanted = [request_id] if isinstance(request_id, str) else list(request_id)
        self.mark_done_each({rid: versions for rid in wanted})

    def mark_done_each(self, versions: dict[str, dict[int, int]]) -> None:
        """Mark several requests `done` in one write, each id stamped with the version of its shard
        that first excluded it (request id → shard → version)."""
        table = self.requests()
        rids, shards = table["request_id"].to_pylist(), table["shard"].to_pylist()
        status, done_at, version = table["status"].to_pylist(), table["completed_at"].to_pylist(), table["model_version"].to_pylist()
        now = datetime.now(timezone.utc)
        for i, rid in enumerate(rids):
            if rid in versions and status[i] != "done":
                status[i], done_at[i], version[i] = "done", now, versions[rid][shards[i]]
        table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
        table = table.set_column(table.schema.get_field_index("completed_at"), "completed_at",
                                 pa.array(done_at, pa.timestamp("us", tz="UTC")))
        table = table.set_column(table.schema.get_field_index("model_version"), "model_version", pa.array(version, pa.int32()))
        self._write(REQUESTS, table)

    def mark_applied_each(self, versions: dict[str, dict[int, int]]) -> None:
        """Mark several requests `applied` in one write: every owning shard committed a version
        without their ids (request id → shard → the first such version, stamped on each id)."""
        self._update(versions, "applied", "applied_at", only_from=("pending",))

    def mark_done_at(self, request_ids: list[str], at: datetime) -> None:
        """Mark applied requests `done` in one write (their registry step and receipts are written), at `at`."""
        self._update(dict.fromkeys(request_ids), "done", "completed_at", only_from=("applied",), at=at)

    def _update(self, versions: dict[str, dict[int, int] | None], status: str, stamp: str, only_from: tuple[str, ...],
                at: datetime | None = None) -> None:
        table = self.requests()
        rids, shards = table["request_id"].to_pylist(), table["shard"].to_pylist()
        statuses, stamps, version = table["status"].to_pylist(), table[stamp].to_pylist(), table["model_version"].to_pylist()
        at = at or datetime.now(timezone.utc)
        for i, rid in enumerate(rids):
            if rid in versions and statuses[i] in only_from:
                statuses[i], stamps[i] = status, at
                if versions[rid] is not None:
                    version[i] = versions[rid][shards[i]]
        for name, values, kind in (("status", statuses, pa.string()), (stamp, stamps, pa.timestamp("us", tz="UTC")),
                                   ("model_version", version, pa.int32())):
            table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, kind))
        self._write(REQUESTS, table)

    def subjects_to_ids(self, subjects: list[str]) -> dict[str, list[int]]:
        """subject → its sample ids in this run; unknown subjects are refused (nothing changed)."""
        from pipeline.data.subject_lists import resolve_subjects

        table = self.assignments()
        if "subject_id" not in table.column_names:
            raise ForgetRequestError("this run has no data subjects (it was trained before they existed); forget by --ids.")
        return resolve_subjects(table["sample_id"].to_numpy(), table["subject_id"].to_numpy(zero_copy_only=False), subjects)

    def owners(self, ids: list[int]) -> dict[int, list[int]]:
        """shard → the ids it owns, for routing a request."""
        table = self.assignments()
        known, shards = table["sample_id"].to_numpy(), table["shard"].to_numpy()
        lookup = dict(zip(known[np.isin(known, ids)].tolist(), shards[np.isin(known, ids)].tolist()))
        out: dict[int, list[int]] = {}
        for sid in ids:
            out.setdefault(int(lookup[sid]), []).append(int(sid))
        return out
