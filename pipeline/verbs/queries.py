"""Verbs that read a run: a request's status (waiting for it if asked), the run's status, one data
subject's status, and predictions of the live ensemble (`dpsisa predict`)."""
from __future__ import annotations

import time

import numpy as np

from pipeline.data import datasets
from pipeline.sisa import cluster, coordinator
from pipeline.sisa.results import ShardStatus
from pipeline.storage import receipts
from pipeline.storage.ledger import STATUSES
from pipeline.storage.paths import resolve_run_dir
from pipeline.storage.rundir import RunError
from pipeline.tracking.release import RegistryObserver
from pipeline.verbs.access import log_backlog, opened, worst_epsilon
from pipeline.verbs.results import Predictions, RequestStatus, RunStatus, SubjectStatus


def request_status(run_dir, request_id: str, wait: bool = False, timeout_s: float | None = None) -> RequestStatus:
    """A request's status from the ledger and its receipt once done; with `wait`, until it is done
    (the run's coordinator is started if needed, and applies it)."""
    run = resolve_run_dir(run_dir)
    rows = run.ledger().requests().to_pandas()
    rows = rows[rows["request_id"] == request_id]
    if rows.empty:
        raise RunError(f"no forget request {request_id} in {run.uri}; `dpsisa status --run-dir ... --json` lists them.")
    if wait and not (rows["status"] == "done").all():
        config = run.config()
        cluster.connect(config.ray)
        with coordinator.Session(run, config, observer=RegistryObserver(), timeout_s=timeout_s) as session:
            session.call("resume")
            session.wait(request_id, rows["sample_id"].tolist(), time.perf_counter())
        rows = run.ledger().requests().to_pandas()
        rows = rows[rows["request_id"] == request_id]
    status = next(st for st in STATUSES if (rows["status"] == st).any())  # the least advanced of its ids
    log_backlog(run.config(), run)
    return RequestStatus(run_dir=run.uri, request_id=request_id, status=status, ids=int(len(rows)),
                         requested_at=str(rows["requested_at"].min()), receipt=receipts.read(run, request_id))


def predict(run_dir, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """(N, C) ensemble probabilities of the live (unlearned) ensemble for each named input array."""
    with opened(run_dir) as (_, _, ensemble, _):
        return {name: ensemble.predict_mean(x) for name, x in inputs.items()}


def prepare_input(name: str, images: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """What `dpsisa predict` accepts: float32 images already normalised like the data loader's
    samples, shaped (N, *input_shape); or raw uint8 images (N, H, W[, C]), normalised here."""
    if images.dtype == np.uint8:
        images = datasets.normalise(name, images)
    if images.ndim != len(input_shape) + 1 or tuple(images.shape[1:]) != tuple(input_shape) or len(images) == 0:
        raise RunError(f"--input holds an array of shape {images.shape} ({images.dtype}); this run expects float32 "
                       f"(N, {', '.join(map(str, input_shape))}) normalised like its data loader, or raw uint8 images.")
    if not np.issubdtype(images.dtype, np.floating) or not np.isfinite(images).all():
        raise RunError(f"--input must hold finite float32 (or raw uint8) images; got {images.dtype}.")
    return np.ascontiguousarray(images, dtype=np.float32)


def serve(run_dir, images: np.ndarray) -> Predictions:
    """`dpsisa predict`: classes and mean-softmax probabilities of the live ensemble, and the model
    version of every shard that made them. It does not wait for pending requests: each shard
    answers from its live version (a replay in progress commits first), and the answer lists the
    requests that were pending while it was made."""
    run = resolve_run_dir(run_dir)
    x = prepare_input(run.config().data.name, images, tuple(run.model_info()["input_shape"]))  # before any actor starts
    with opened(run, complete_pending=False) as (config, _, ensemble, _):
        pending = set(run.ledger().pending())
        probs, versions = ensemble.predict_live(x)
        pending |= set(run.ledger().pending())
    return Predictions(run_dir=run.uri, predictions=probs.argmax(axis=1).tolist(), probabilities=probs.tolist(),
                       model_versions=versions, pending_requests=sorted(pending))


def status(run_dir) -> RunStatus:
    """Read from storage; reaches the coordinator only to complete a pending request. Each shard's
    node and device are those of its running actor when the run is warm, else those recorded by
    the commit of its live version."""
    run = resolve_run_dir(run_dir)
    config = run.config()
    ledger = run.ledger()
    live: dict[int, dict] = {}
    cluster.connect(config.ray)
    if ledger.pending() or ledger.applied() or coordinator.find(run, config) is not None:
        with opened(run) as (_, _, ensemble, _):
            live = ensemble.status()
    requests = ledger.requests()
    by_request: dict[str, dict] = {}
    for rid, st in zip(requests["request_id"].to_pylist(), requests["status"].to_pylist()):
        entry = by_request.setdefault(rid, {"request_id": rid, "status": st, "ids": 0})
        entry["ids"] += 1
    shards = []
    for s in range(config.shards.count):
        m = run.shard(s).manifest()
        where = live.get(s) or m.releases[-1]
        shards.append(ShardStatus(
            shard=s, version=m.version, forgotten=len(m.forgotten), samples=m.stages[-1]["samples"],
            epsilon=m.releases[-1]["epsilon"], epsilon_cumulative=m.releases[-1]["epsilon_cumulative"],
            releases=len(m.releases), node=where.get("node"), host=where.get("host"), device=where.get("device"),
            live=s in live))
    return RunStatus(run_dir=run.uri, shards=tuple(shards),
                     pending=[r for r in by_request.values() if r["status"] == "pending"],
                     applied=[r for r in by_request.values() if r["status"] == "applied"],
                     done=[r for r in by_request.values() if r["status"] == "done"],
                     epsilon_target=config.privacy.epsilon, delta=config.privacy.delta,
                     privacy=run.person_privacy(worst_epsilon([s.epsilon_cumulative for s in shards])),
                     coordinator="warm" if live else "stopped")


def subject_status(run_dir, subject: str) -> SubjectStatus:
    """Where one data subject's samples are and which model versions saw them (read from storage)."""
    run = resolve_run_dir(run_dir)
    ledger = run.ledger()
    ids = ledger.subjects_to_ids([subject])[subject]
    table = ledger.assignments().to_pandas().set_index("sample_id").loc[ids]
    requests = ledger.requests().to_pandas()
    requests = requests[requests["sample_id"].isin(ids)].set_index("sample_id")
    live = {s: run.shard(s).manifest().version for s in sorted(set(table["shard"].tolist()))}
    samples = []
    for sid in ids:
        shard = int(table.loc[sid, "shard"])
        row = requests.loc[sid] if sid in requests.index else None
        if row is None:
            state, request, first_without = "trained on by the live version", None, None
        elif row["status"] == "pending":
            state, request, first_without = "erasure pending", row["request_id"], None
        elif row["status"] == "applied":
            state, request, first_without = "erased from the shards; registry pending", row["request_id"], int(row["model_version"])
        else:
            state, request, first_without = "erased", row["request_id"], int(row["model_version"])
        saw = list(range(first_without if first_without is not None else live[shard] + 1))
        samples.append({"sample_id": int(sid), "shard": shard, "slice": int(table.loc[sid, "slice"]), "status": state,
                        "request_id": request, "versions_that_saw_it": saw, "first_version_without_it": first_without,
                        "live_version": live[shard]})
    return SubjectStatus(run_dir=run.uri, subject=subject, samples=samples,
                         erased=all(x["status"] == "erased" for x in samples),
                         receipts=sorted({x["request_id"] for x in samples if x["status"] == "erased"}))
