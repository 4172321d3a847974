"""What each user-facing verb does, over a run directory. The CLI, the `jobs/` wrappers, the
benchmarks and the sweep all call these functions.

A run directory is a local path or a URI (`s3://bucket/prefix`, ...): see `rundir.RunDir` for
its layout. After training, every verb reaches the shards through the run's coordinator
(`sisa/coordinator/`, the run's single writer): the one forget engine. Inside a Tune trial
(`placement`: the trial's placement group) that coordinator and its shards live in the trial's
group and go with the trial.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

import numpy as np

from pipeline.config import Config
from pipeline.core.pretrain import for_target, public_model
from pipeline.core.privacy import make_recipe
from pipeline.core.train import ids_digest, resolve_device
from pipeline.data import datasets, subjects
from pipeline.data.partition import key_record, partition
from pipeline.evaluation import evaluate, lira
from pipeline.sisa import cluster, coordinator
from pipeline.sisa.driver import Ensemble, Placement, ShardLayout
from pipeline.sisa.results import ForgetResult, ShardStatus
from pipeline.storage import receipts
from pipeline.storage.ledger import STATUSES
from pipeline.storage.paths import home, resolve_local_dir, resolve_run_dir  # noqa: F401  (runs.X kept for callers)
from pipeline.storage.rundir import RunDir, RunError, open_run, trained_ids
from pipeline.tracking import mlflow_runs as tracking
from pipeline.tracking import registry
from pipeline.tracking.release import RegistryObserver
from pipeline.verbs import references

__all__ = ["RunError", "RunDir"]


PARTITION_FILE = "partition.json"  # how each id's shard and slice follow from the key: recomputable from the ids


def load_run_config(run_dir) -> Config:
    return open_run(run_dir).config()


def _check_private_rows(data: datasets.Data) -> None:
    if not np.array_equal(data.private.ids, np.arange(len(data.private.ids))):
        raise RunError("private sample ids must equal their row positions; this data split is not supported.")


class RunData:
    """The run's data set, loaded on first use (warm actors do not need it for a forget)."""

    def __init__(self, config: Config):
        self.config, self._data = config, None

    def get(self) -> datasets.Data:
        if self._data is None:
            self._data = datasets.load(self.config.data)
        return self._data


def _log_version(config: Config, run: RunDir, mlrun, requests: list[str]) -> dict | None:
    """The live model version in MLflow: the ids it trained on as a data set input, and the
    ensemble as a registered model (alias `live`; see registry.py). Returns the registry names."""
    ids, labels = trained_ids(run)
    mlrun.log_dataset(config, ids, labels)
    try:
        return registry.register_live(config, run, mlrun.run_id, ids_digest(ids), requests)
    except Exception as exc:  # noqa: BLE001 - the model version is applied and recorded; only its registration failed
        warnings.warn(f"MLflow: could not register the live ensemble ({exc.__class__.__name__}: {exc})", stacklevel=2)
        return None


def _log_completed(config: Config, run: RunDir, completed: dict[str, ForgetResult]) -> None:
    """Each request finished on behalf of a crashed writer becomes a forget child run in MLflow."""
    for result in completed.values():
        with tracking.verb_run("forget", config, run, tags={"dpsisa.completed_pending": "true"}) as mlrun:
            mlrun.log_dataset(config, *trained_ids(run))
            mlrun.log_summary(result.to_dict())


def log_backlog(config: Config, run: RunDir) -> int:
    """Requests applied while no client waited (`forget --no-wait`) reach MLflow here: the run's
    next command logs all of them in one forget child run (their receipts as artifacts, latency
    metrics), so a burst of requests is one MLflow run, not a burst of writes. Returns how many."""
    if not config.tracking.enabled:
        return 0
    backlog = receipts.backlog(run)
    if not backlog:
        return 0
    seconds = [(datetime.fromisoformat(r["completed_at"]) - datetime.fromisoformat(r["requested_at"])).total_seconds()
               for r in backlog]
    with tracking.verb_run("forget", config, run, tags={"dpsisa.no_wait": "true", "dpsisa.requests": str(len(backlog))}) as mlrun:
        mlrun.log_jsons({f"{receipts.FOLDER}/{r['request_id']}.json": r for r in backlog})
        _log_version(config, run, mlrun, [r["request_id"] for r in backlog])
        mlrun.log_summary({"requests": len(backlog), "ids": sum(len(r["sample_ids"]) for r in backlog),
                           "subjects": sum(len(r["subjects"]) for r in backlog),
                           "p50_seconds": float(np.median(seconds)), "max_seconds": max(seconds),
                           "request_ids": [r["request_id"] for r in backlog]})
    receipts.mark_logged(run, [r["request_id"] for r in backlog])
    return len(backlog)


@contextmanager
def opened(run_dir, log: Callable = print, placement: Placement | None = None, complete_pending: bool = True,
           timeout_s: float | None = None) -> Iterator[tuple[Config, RunData, Ensemble, coordinator.Session]]:
    """Config, lazily loaded data and the run's live ensemble: its coordinator's shard actors (warm
    when kept alive; in a Tune trial's placement group with `placement`). Pending requests a crash
    left are completed first (and logged to MLflow)."""
    run = open_run(run_dir)
    config = run.config()
    cluster.connect(config.ray, log)
    data = RunData(config)
    with coordinator.Session(run, config, log, observer=RegistryObserver(), timeout_s=timeout_s,
                             placement=placement) as session:
        if complete_pending:
            _log_completed(config, run, session.complete_pending())
        log_backlog(config, run)
        yield config, data, Ensemble.attached(run, config, session.actors), session


def _other_half(config: Config, n_private: int) -> list[int]:
    """Private ids a run with `data.keep_half` leaves out: its LiRA non-members (`pipeline/references.py`)."""
    if config.data.keep_half is None:
        return []
    return np.flatnonzero(~lira.paired_halves(1, n_private, config.data.keep_half)[0]).tolist()


def train(config: Config, run_dir, keep_alive: bool = False, log: Callable = print, placement: Placement | None = None,
          exclude_ids: list[int] | None = None) -> dict:
    """Partition, pretrain (cached), calibrate DP, train all shards in parallel, evaluate, track.

    The run directory gets everything the shard actors need to (re)start anywhere: the config,
    recipes, the pretrained model and each shard's own data file. `exclude_ids` leaves private ids
    out of the partition altogether: the retrain-from-scratch oracle that unlearning scores compare
    against (the ledger then does not know those ids). With `keep_alive`, the run's coordinator
    and its shard actors stay up after training (warm forgets; `dpsisa stop` releases them)."""
    run = resolve_run_dir(run_dir)
    if run.is_run():
        raise RunError(f"run directory {run.uri} already holds a run; choose a new --run-dir.")
    run.ensure()
    run.check_writable()  # a missing bucket or a read-only folder fails here, before any MLflow run exists
    with tracking.verb_run("train", config, run) as mlrun:
        started = time.perf_counter()
        local = cluster.connect(config.ray, log)
        ShardLayout.for_placement(config, placement)  # shards that cannot fit fail here, before any work
        if keep_alive and local:
            log("note: --keep-alive on a Ray cluster this command started: its actors stay warm until this process exits; "
                "for later commands use `ray start --head`.")
        data = datasets.load(config.data)
        _check_private_rows(data)
        log(f"data: {config.data.name}: {len(data.private.y)} private, {len(data.public.y)} public, {len(data.test.y)} test samples")
        ids = data.private.ids
        excluded = sorted(set(exclude_ids or ()) | set(_other_half(config, len(ids))))
        if excluded:
            unknown = [i for i in excluded if not 0 <= i < len(ids)]
            if unknown:
                raise RunError(f"exclude_ids {unknown[:5]} are not private sample ids (0..{len(ids) - 1}).")
            ids = np.setdiff1d(ids, np.asarray(excluded, dtype=ids.dtype))
            why = "the other half of the pool (data.keep_half)" if config.data.keep_half is not None else "retrain-from-scratch oracle"
            log(f"excluding {len(excluded)} private id(s) from training ({why})")
        owners = subjects.for_private_ids(config.data.subjects, data.private.ids)  # who each sample belongs to
        columns = partition(ids, data.private.y[ids], config.shards.count, config.shards.slices,
                            config.partition.strategy, config.seed, data.private.x[ids], subjects=owners[ids],
                            key=config.partition.key)
        run.write_json(PARTITION_FILE, {"strategy": config.partition.strategy, **key_record(config.seed, config.partition.key)})
        ledger = run.ledger()
        ledger.write_assignments({**columns, "label": data.private.y[columns["sample_id"]],
                                  "subject_id": owners[columns["sample_id"]]})
        source, pretrain_info = public_model(config, data, log)
        model = for_target(source, config, data)
        run.write_pretrained(model, data.input_shape, data.num_classes)
        for s in range(config.shards.count):  # each shard actor loads only its own samples
            own = np.sort(columns["sample_id"][columns["shard"] == s])
            run.shard(s).write_data(0, own, data.private.x[own], data.private.y[own])
        recipes = [make_recipe(config, s, [len(ids) for ids in slices], [len(set(owners[ids])) for ids in slices])
                   for s, slices in enumerate(map(ledger.shard_slices, range(config.shards.count)))]
        if config.privacy.epsilon is not None:
            log(f"DP: ε={config.privacy.epsilon} per {recipes[0].unit}, δ={config.privacy.delta}, σ per shard "
                f"{sorted({round(r.noise_multiplier, 3) for r in recipes})} over {config.shards.slices} slice stages")
        run.write_recipes(recipes)
        run.write_config(config)
        registry.write_input_example(run, data.test.x)
        warm = keep_alive and placement is None
        session = coordinator.Session(run, config, log, keep_alive=True, observer=RegistryObserver()).__enter__() if warm else None
        if session is not None:  # train on the actors the run's coordinator keeps: no second start for warm forgets
            ensemble = Ensemble.attached(run, config, session.actors)
            log(f"started the run's coordinator and its {len(session.actors)} shard actors (kept alive)")
        else:
            ensemble = Ensemble.start(run, config, [r.to_dict() for r in recipes], placement=placement, log=log)
        try:
            fit_start = time.perf_counter()
            log(f"training {config.shards.count} shards × {config.shards.slices} slices "
                f"({config.finetune.strategy}, {'ε=' + str(config.privacy.epsilon) if recipes[0].noise_multiplier else 'no DP'})")
            per_shard = ensemble.fit(log, on_stage=mlrun.log_stage)
            full_train_seconds = time.perf_counter() - fit_start
            run.write_summary({
                "full_train_seconds": full_train_seconds, "shard_seconds": [per_shard[s]["seconds"] for s in sorted(per_shard)],
                "keep_alive": keep_alive, "pretrain": pretrain_info, "excluded_ids": excluded})
            metrics = evaluate.ensemble_metrics(ensemble, data)
            metrics["public_accuracy"] = evaluate.public_accuracy(source, pretrain_info["source_classes"], config, data)
        except BaseException:
            if session is not None:  # a run that did not train keeps no coordinator
                coordinator.stop(run, config)
            raise
        finally:
            ensemble.shutdown()  # (the coordinator's actors are not this ensemble's: they stay)
            if session is not None:
                session.__exit__(None, None, None)
        if warm:
            log("the run's coordinator and its shard actors stay up (warm forgets); `dpsisa stop` releases them")
        summary = {"run_dir": run.uri, "full_train_seconds": full_train_seconds,
                   "total_seconds": time.perf_counter() - started, **metrics}
        summary.update(_log_version(config, run, mlrun, []) or {})
        mlrun.log_summary(summary)
    return summary


def forget(run_dir, ids: list[int] | None, log: Callable = print, placement: Placement | None = None,
           subjects: list[str] | None = None, timeout_s: float | None = None) -> ForgetResult:
    """Submit a forget request to the run's coordinator and wait until it is applied. With
    `subjects`, the request is every sample those data subjects own."""
    run = resolve_run_dir(run_dir)
    config = run.config()
    ids = _ids_of(run, ids, subjects, log)
    with tracking.verb_run("forget", config, run) as mlrun:
        with opened(run, log, placement=placement, timeout_s=timeout_s) as (config, data, ensemble, session):
            result = session.forget(ids, on_stage=mlrun.log_stage)
        result.full_train_seconds = run.summary()["full_train_seconds"]
        result.speedup = result.full_train_seconds / max(result.seconds, 1e-9)
        replayed, total = replay_work([r.to_dict() for r in run.recipes()], result.from_stage)
        result.samples_processed, result.full_train_samples, result.work_fraction = replayed, total, replayed / total
        result.subjects = list(subjects or [])
        result.receipt = receipts.read(run, result.request_id)
        if result.receipt is not None:
            mlrun.log_json(f"{receipts.FOLDER}/{result.request_id}.json", result.receipt)
        # the ids the version this request made live trained on (its registration is the coordinator's run)
        mlrun.log_dataset(config, *trained_ids(run))
        mlrun.log_summary(result.to_dict())
    return result


def _ids_of(run: RunDir, ids: list[int] | None, subjects: list[str] | None, log: Callable) -> list[int]:
    if subjects:
        owned = run.ledger().subjects_to_ids(subjects)
        ids = sorted(i for sample_ids in owned.values() for i in sample_ids)
        log(f"subject(s) {', '.join(subjects)}: {len(ids)} sample(s)")
    run.ledger().validate(ids)  # fail fast, before any actor starts (the coordinator re-checks under its lock)
    return ids


def submit(run_dir, ids: list[int] | None, log: Callable = print, subjects: list[str] | None = None,
           each: bool = False) -> dict:
    """`forget --no-wait`: record the request durably through the run's coordinator and return its
    id at once; the coordinator applies it (with whatever else is pending) and writes its receipt.
    With `each`, every subject is its own request, all recorded in one write (`requests` lists
    them). Follow it with `dpsisa request --run-dir R --id ID [--wait]`."""
    run = resolve_run_dir(run_dir)
    config = run.config()
    if each:
        if not subjects:
            raise RunError("--each makes one request per data subject: give --subject or --subjects-file.")
        owned = run.ledger().subjects_to_ids(subjects)
        groups = [(s, sorted(owned[s])) for s in subjects]
        run.ledger().validate([i for _, g in groups for i in g])  # fail fast; the coordinator re-checks
        log(f"{len(groups)} subject(s), one request each: {sum(len(g) for _, g in groups)} sample(s)")
    else:
        groups = [(None, _ids_of(run, ids, subjects, log))]
    if cluster.connect(config.ray, log):
        log("warning: --no-wait on a Ray cluster this command started: it stops when the command exits, and the "
            "request stays pending until the run's next command (use `ray start --head` / RAY_ADDRESS=auto).")
    with coordinator.Session(run, config, log, observer=RegistryObserver()) as session:
        request_ids = session.submit_batch([g for _, g in groups])
    if each:
        return {"run_dir": run.uri, "status": "pending", "ids": sum(len(g) for _, g in groups),
                "requests": [{"request_id": rid, "subject": s, "ids": len(g)} for rid, (s, g) in zip(request_ids, groups)]}
    return {"run_dir": run.uri, "request_id": request_ids[0], "status": "pending", "ids": len(groups[0][1]),
            "subjects": list(subjects or [])}


def request_status(run_dir, request_id: str, wait: bool = False, log: Callable = print, timeout_s: float | None = None) -> dict:
    """A request's status from the ledger and its receipt once done; with `wait`, until it is done
    (the run's coordinator is started if needed, and applies it)."""
    run = resolve_run_dir(run_dir)
    rows = run.ledger().requests().to_pandas()
    rows = rows[rows["request_id"] == request_id]
    if rows.empty:
        raise RunError(f"no forget request {request_id} in {run.uri}; `dpsisa status --run-dir ... --json` lists them.")
    if wait and not (rows["status"] == "done").all():
        config = run.config()
        cluster.connect(config.ray, log)
        with coordinator.Session(run, config, log, observer=RegistryObserver(), timeout_s=timeout_s) as session:
            session.call("resume")
            session.wait(request_id, rows["sample_id"].tolist(), time.perf_counter())
        rows = run.ledger().requests().to_pandas()
        rows = rows[rows["request_id"] == request_id]
    status = next(st for st in STATUSES if (rows["status"] == st).any())  # the least advanced of its ids
    log_backlog(run.config(), run)
    return {"run_dir": run.uri, "request_id": request_id, "status": status, "ids": int(len(rows)),
            "requested_at": str(rows["requested_at"].min()), "receipt": receipts.read(run, request_id)}


def predict(run_dir, inputs: dict[str, np.ndarray], log: Callable = print) -> dict[str, np.ndarray]:
    """(N, C) ensemble probabilities of the live (unlearned) ensemble for each named input array."""
    with opened(run_dir, log) as (_, _, ensemble, _):
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


def serve(run_dir, images: np.ndarray, log: Callable = print) -> dict:
    """`dpsisa predict`: classes and mean-softmax probabilities of the live ensemble, and the model
    version of every shard that made them. It does not wait for pending requests: each shard
    answers from its live version (a replay in progress commits first), and the answer lists the
    requests that were pending while it was made."""
    run = resolve_run_dir(run_dir)
    x = prepare_input(run.config().data.name, images, tuple(run.model_info()["input_shape"]))  # before any actor starts
    with opened(run, log, complete_pending=False) as (config, _, ensemble, _):
        pending = set(run.ledger().pending())
        probs, versions = ensemble.predict_live(x)
        pending |= set(run.ledger().pending())
    return {"run_dir": run.uri, "predictions": probs.argmax(axis=1).tolist(), "probabilities": probs.tolist(),
            "model_versions": versions, "pending_requests": sorted(pending)}


def replay_work(recipes: list[dict], from_stage: dict[str, int | None]) -> tuple[float, float]:
    """(replayed, total) SGD sample-steps (steps × expected batch) of a forget versus full training:
    SISA's cost model — an id in an early slice forces replaying almost the whole shard."""
    def work(recipe: dict, first: int) -> float:
        return sum(s["steps"] * recipe["batch_size"] for s in recipe["stages"][first:])

    total = sum(work(r, 0) for r in recipes)
    replayed = sum(work(recipes[int(s)], k) for s, k in from_stage.items() if k is not None)
    return replayed, total


def evaluate_run(run_dir, log: Callable = print, placement: Placement | None = None, probe_ids: list[int] | None = None,
                 reference_models: int | None = None, reference_dir: str | None = None) -> dict:
    """Test metrics and membership-inference attacks; `probe_ids` (e.g. ids about to be
    forgotten) are attacked in place of the forgotten ids. With `reference_models` K, also LiRA
    with K reference runs (trained first, or reused from `reference_dir`; `pipeline/references.py`)."""
    run = resolve_run_dir(run_dir)
    if reference_models is not None:
        references.check_count(reference_models)
    with tracking.verb_run("evaluate", run.config(), run) as mlrun:
        refs = references.ensure(run, run.config(), reference_models, reference_dir, log, train=train) if reference_models else []
        with opened(run, log, placement=placement) as (config, data, ensemble, _):
            metrics = evaluate.ensemble_metrics(ensemble, data.get())
            log("membership-inference attacks (members vs non-members, forgotten vs non-members) ...")
            metrics.update(evaluate.membership_inference(ensemble, data.get(), run.ledger().forgotten_ids(), config.seed,
                                                         probe_ids=probe_ids))
            metrics.update(run.person_privacy(_worst(metrics["epsilon_cumulative"])))
            if refs:
                probe = references.probe(run, data.get(), config.seed)
        if refs:  # the target's actors are released first; target and references predict logits in this process
            metrics["lira"] = references.attack(probe, run, refs, log)
        mlrun.log_summary(metrics)
    return metrics


def verify(run_dir, all_shards: bool = False, log: Callable = print) -> dict:
    """Retrain touched shards from scratch without their forgotten ids; compare bit for bit."""
    run = resolve_run_dir(run_dir)
    with tracking.verb_run("verify", run.config(), run) as mlrun:
        with opened(run, log) as (config, data, ensemble, _):
            touched = [s for s in range(config.shards.count) if all_shards or run.shard(s).manifest().version > 0]
            log(f"verifying shard(s) {touched} against from-scratch retraining ...")
            test = data.get().test
            results = ensemble.verify(touched, test.x, log=log)
            report = evaluate.unlearning_report(ensemble, data.get(), run.ledger().forgotten_ids(),
                                                {s: r.pop("oracle_probs") for s, r in results.items()}, config.seed)
        stamped = receipts.record_verify(run, results)
        registry.record_verify(config, run, all(r["exact"] for r in results.values()))
        summary = {"exact": all(r["exact"] for r in results.values()), "shards_checked": touched, "receipts_verified": stamped,
                   "shards": [results[s] for s in touched], "device": str(resolve_device(config.train.device)),
                   "unlearning": report}
        mlrun.log_summary({"exact": float(summary["exact"]), "shards_checked": len(touched),
                         **{f"unlearning.{k}": v for k, v in report.items()}})
    return summary


def status(run_dir, log: Callable = print) -> dict:
    """Read from storage; reaches the coordinator only to complete a pending request. Each shard's
    node and device are those of its running actor when the run is warm, else those recorded by
    the commit of its live version."""
    run = resolve_run_dir(run_dir)
    config = run.config()
    ledger = run.ledger()
    live: dict[int, dict] = {}
    cluster.connect(config.ray, log)
    if ledger.pending() or ledger.applied() or coordinator.find(run, config) is not None:
        with opened(run, log) as (_, _, ensemble, _):
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
    return {"run_dir": run.uri, "shards": [s.to_dict() for s in shards],
            "pending": [r for r in by_request.values() if r["status"] == "pending"],
            "applied": [r for r in by_request.values() if r["status"] == "applied"],
            "done": [r for r in by_request.values() if r["status"] == "done"],
            "epsilon_target": config.privacy.epsilon, "delta": config.privacy.delta,
            **run.person_privacy(_worst([s.epsilon_cumulative for s in shards])),
            "coordinator": "warm" if live else "stopped"}


def _worst(epsilons: list[float | None]) -> float | None:
    """The largest ε over shards (a person lives in one shard); None without DP."""
    return None if not epsilons or None in epsilons else max(epsilons)


def subject_status(run_dir, subject: str) -> dict:
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
    return {"run_dir": run.uri, "subject": subject, "samples": samples,
            "erased": all(x["status"] == "erased" for x in samples),
            "receipts": sorted({x["request_id"] for x in samples if x["status"] == "erased"})}


def stop(run_dir, log: Callable = print) -> dict:
    """Release the run's coordinator and its shard actors (kept alive by `train --keep-alive`)."""
    run = resolve_run_dir(run_dir)
    config = run.config()
    cluster.connect(config.ray, log)
    stopped = coordinator.stop(run, config)
    run.write_summary({**run.summary(), "keep_alive": False})
    return {"run_dir": run.uri, "actors_stopped": stopped}
