"""What each user-facing verb does, over a run directory. The CLI, the `jobs/` wrappers, the
benchmarks and the sweep all call these functions.

A run directory is a local path or a URI (`s3://bucket/prefix`, ...): see `rundir.RunDir` for
its layout. After training, every verb reaches the shards through the run's coordinator
(`sisa/coordinator/`, the run's single writer): the one forget engine. Inside a Tune trial
(`placement`: the trial's placement group) that coordinator and its shards live in the trial's
group and go with the trial.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from pipeline.config import Config
from pipeline.core.pretrain import for_target, public_model
from pipeline.core.privacy import make_recipe
from pipeline.core.train import resolve_device
from pipeline.data import datasets, subjects
from pipeline.data.partition import key_record, partition
from pipeline.sisa import cluster, coordinator
from pipeline.sisa.driver import Ensemble, Placement, ShardLayout
from pipeline.sisa.results import ForgetResult
from pipeline.storage import receipts
from pipeline.storage.paths import home, resolve_local_dir, resolve_run_dir  # noqa: F401  (runs.X kept for callers)
from pipeline.storage.rundir import RunDir, RunError, trained_ids
from pipeline.tracking import mlflow_runs as tracking
from pipeline.tracking import registry
from pipeline.tracking.release import RegistryObserver
from pipeline.verbs.access import RunData, _log_version, load_run_config, opened, worst_epsilon  # noqa: F401  (runs.X kept for callers)
from pipeline.verbs.queries import predict, prepare_input, request_status, serve, status, subject_status  # noqa: F401
from pipeline.verbs.results import Evaluation, Stopped, Submission, SubmittedRequest, TrainSummary, Verification

logger = logging.getLogger(__name__)

__all__ = ["RunError", "RunDir"]


PARTITION_FILE = "partition.json"  # how each id's shard and slice follow from the key: recomputable from the ids


def _check_private_rows(data: datasets.Data) -> None:
    if not np.array_equal(data.private.ids, np.arange(len(data.private.ids))):
        raise RunError("private sample ids must equal their row positions; this data split is not supported.")


def _other_half(config: Config, n_private: int) -> list[int]:
    """Private ids a run with `data.keep_half` leaves out: its LiRA non-members (`pipeline/references.py`)."""
    if config.data.keep_half is None:
        return []
    from pipeline.evaluation import lira

    return np.flatnonzero(~lira.paired_halves(1, n_private, config.data.keep_half)[0]).tolist()


def train(config: Config, run_dir, keep_alive: bool = False, placement: Placement | None = None,
          exclude_ids: list[int] | None = None, hold: bool = False) -> TrainSummary:
    """Partition, pretrain (cached), calibrate DP, train all shards in parallel, evaluate, track.

    The run directory gets everything the shard actors need to (re)start anywhere: the config,
    recipes, the pretrained model and each shard's own data file. `exclude_ids` leaves private ids
    out of the partition altogether: the retrain-from-scratch oracle that unlearning scores compare
    against (the ledger then does not know those ids). With `keep_alive`, the run's coordinator
    and its shard actors stay up after training (warm forgets; `dpsisa stop` releases them). `hold`
    does the same for a caller in this process that goes on with the run and then calls `stop`
    (e.g. `score`: its forget replays on the actors that trained), without the note meant for a
    command that ends."""
    # evaluation is imported by the verbs that use it: scipy and scikit-learn (~1.6 s) stay out of forget and status
    from pipeline.evaluation import evaluate

    run = resolve_run_dir(run_dir)
    if run.is_run():
        raise RunError(f"run directory {run.uri} already holds a run; choose a new --run-dir.")
    run.ensure()
    run.check_writable()  # a missing bucket or a read-only folder fails here, before any MLflow run exists
    with tracking.verb_run("train", config, run) as mlrun:
        started = time.perf_counter()
        local = cluster.connect(config.ray)
        ShardLayout.for_placement(config, placement)  # shards that cannot fit fail here, before any work
        if keep_alive and local:
            logger.warning("note: --keep-alive on a Ray cluster this command started: its actors stay warm until this process exits; "
                "for later commands use `ray start --head`.")
        data = datasets.load(config.data)
        _check_private_rows(data)
        logger.info(f"data: {config.data.name}: {len(data.private.y)} private, {len(data.public.y)} public, "
                    f"{len(data.test.y)} test samples")
        ids = data.private.ids
        excluded = sorted(set(exclude_ids or ()) | set(_other_half(config, len(ids))))
        if excluded:
            unknown = [i for i in excluded if not 0 <= i < len(ids)]
            if unknown:
                raise RunError(f"exclude_ids {unknown[:5]} are not private sample ids (0..{len(ids) - 1}).")
            ids = np.setdiff1d(ids, np.asarray(excluded, dtype=ids.dtype))
            why = "the other half of the pool (data.keep_half)" if config.data.keep_half is not None else "retrain-from-scratch oracle"
            logger.info(f"excluding {len(excluded)} private id(s) from training ({why})")
        owners = subjects.for_private_ids(config.data.subjects, data.private.ids)  # who each sample belongs to
        columns = partition(ids, data.private.y[ids], config.shards.count, config.shards.slices,
                            config.partition.strategy, config.seed, data.private.x[ids], subjects=owners[ids],
                            key=config.partition.key)
        run.write_json(PARTITION_FILE, {"strategy": config.partition.strategy, **key_record(config.seed, config.partition.key)})
        ledger = run.ledger()
        ledger.write_assignments({**columns, "label": data.private.y[columns["sample_id"]],
                                  "subject_id": owners[columns["sample_id"]]})
        source, pretrain_info = public_model(config, data)
        model = for_target(source, config, data)
        run.write_pretrained(model, data.input_shape, data.num_classes)
        for s in range(config.shards.count):  # each shard actor loads only its own samples
            own = np.sort(columns["sample_id"][columns["shard"] == s])
            run.shard(s).write_data(0, own, data.private.x[own], data.private.y[own])
        recipes = [make_recipe(config, s, [len(ids) for ids in slices], [len(set(owners[ids])) for ids in slices])
                   for s, slices in enumerate(map(ledger.shard_slices, range(config.shards.count)))]
        if config.privacy.epsilon is not None:
            logger.info(f"DP: ε={config.privacy.epsilon} per {recipes[0].unit}, δ={config.privacy.delta}, σ per shard "
                f"{sorted({round(r.noise_multiplier, 3) for r in recipes})} over {config.shards.slices} slice stages")
        run.write_recipes(recipes)
        run.write_config(config)
        registry.write_input_example(run, data.test.x)
        warm = (keep_alive or hold) and placement is None
        session = coordinator.Session(run, config, keep_alive=True, observer=RegistryObserver()).__enter__() if warm else None
        if session is not None:  # train on the actors the run's coordinator keeps: no second start for warm forgets
            ensemble = Ensemble.attached(run, config, session.actors)
            logger.info(f"started the run's coordinator and its {len(session.actors)} shard actors (kept alive)")
        else:
            ensemble = Ensemble.start(run, config, [r.to_dict() for r in recipes], placement=placement)
        try:
            fit_start = time.perf_counter()
            logger.info(f"training {config.shards.count} shards × {config.shards.slices} slices "
                f"({config.finetune.strategy}, {'ε=' + str(config.privacy.epsilon) if recipes[0].noise_multiplier else 'no DP'})")
            per_shard = ensemble.fit(on_stage=mlrun.log_stage)
            full_train_seconds = time.perf_counter() - fit_start
            run.write_summary({
                "full_train_seconds": full_train_seconds, "shard_seconds": [per_shard[s]["seconds"] for s in sorted(per_shard)],
                "keep_alive": warm, "pretrain": pretrain_info, "excluded_ids": excluded})
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
        if warm and not hold:
            logger.info("the run's coordinator and its shard actors stay up (warm forgets); `dpsisa stop` releases them")
        registered = _log_version(config, run, mlrun, []) or {}
        summary = TrainSummary(run_dir=run.uri, full_train_seconds=full_train_seconds,
                               total_seconds=time.perf_counter() - started, metrics=metrics,
                               registered_model=registered.get("registered_model"),
                               registered_version=registered.get("registered_version"))
        mlrun.log_summary(summary.to_dict())
    return summary


def forget(run_dir, ids: list[int] | None, placement: Placement | None = None,
           subjects: list[str] | None = None, timeout_s: float | None = None) -> ForgetResult:
    """Submit a forget request to the run's coordinator and wait until it is applied. With
    `subjects`, the request is every sample those data subjects own."""
    run = resolve_run_dir(run_dir)
    config = run.config()
    ids = _ids_of(run, ids, subjects)
    with tracking.verb_run("forget", config, run, optional=True) as mlrun:
        with opened(run, placement=placement, timeout_s=timeout_s) as (config, data, ensemble, session):
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


def _ids_of(run: RunDir, ids: list[int] | None, subjects: list[str] | None) -> list[int]:
    ledger = run.ledger()
    if subjects:
        owned = ledger.subjects_to_ids(subjects)
        ids = sorted(i for sample_ids in owned.values() for i in sample_ids)
        logger.info(f"subject(s) {', '.join(subjects)}: {len(ids)} sample(s)")
    ledger.validate(ids)  # fail fast, before any actor starts (the coordinator decides, under its lock)
    return ids


def submit(run_dir, ids: list[int] | None, subjects: list[str] | None = None,
           each: bool = False) -> Submission:
    """`forget --no-wait`: record the request durably through the run's coordinator and return its
    id at once; the coordinator applies it (with whatever else is pending) and writes its receipt.
    With `each`, every subject is its own request, all recorded in one write (`requests` lists
    them). Follow it with `dpsisa request --run-dir R --id ID [--wait]`."""
    run = resolve_run_dir(run_dir)
    config = run.config()
    if each:
        if not subjects:
            raise RunError("--each makes one request per data subject: give --subject or --subjects-file.")
        ledger = run.ledger()
        owned = ledger.subjects_to_ids(subjects)
        groups = [(s, sorted(owned[s])) for s in subjects]
        ledger.validate([i for _, g in groups for i in g])  # fail fast; the coordinator decides under its lock
        logger.info(f"{len(groups)} subject(s), one request each: {sum(len(g) for _, g in groups)} sample(s)")
    else:
        groups = [(None, _ids_of(run, ids, subjects))]
    if cluster.connect(config.ray):
        logger.warning("warning: --no-wait on a Ray cluster this command started: it stops when the command exits, and the "
            "request stays pending until the run's next command (use `ray start --head` / RAY_ADDRESS=auto).")
    with coordinator.Session(run, config, observer=RegistryObserver()) as session:
        request_ids = session.submit_batch([g for _, g in groups])
    if each:
        return Submission(run_dir=run.uri, ids=sum(len(g) for _, g in groups),
                          requests=tuple(SubmittedRequest(rid, s, len(g)) for rid, (s, g) in zip(request_ids, groups)))
    return Submission(run_dir=run.uri, ids=len(groups[0][1]), request_id=request_ids[0], subjects=tuple(subjects or ()))


def replay_work(recipes: list[dict], from_stage: dict[str, int | None]) -> tuple[float, float]:
    """(replayed, total) SGD sample-steps (steps × expected batch) of a forget versus full training:
    SISA's cost model — an id in an early slice forces replaying almost the whole shard."""
    def work(recipe: dict, first: int) -> float:
        return sum(s["steps"] * recipe["batch_size"] for s in recipe["stages"][first:])

    total = sum(work(r, 0) for r in recipes)
    replayed = sum(work(recipes[int(s)], k) for s, k in from_stage.items() if k is not None)
    return replayed, total


def evaluate_run(run_dir, placement: Placement | None = None, probe_ids: list[int] | None = None,
                 reference_models: int | None = None, reference_dir: str | None = None) -> Evaluation:
    """Test metrics and membership-inference attacks; `probe_ids` (e.g. ids about to be
    forgotten) are attacked in place of the forgotten ids. With `reference_models` K, also LiRA
    with K reference runs (trained first, or reused from `reference_dir`; `pipeline/references.py`)."""
    from pipeline.evaluation import evaluate
    from pipeline.verbs import references

    run = resolve_run_dir(run_dir)
    if reference_models is not None:
        references.check_count(reference_models)
    with tracking.verb_run("evaluate", run.config(), run, optional=True) as mlrun:
        refs = references.ensure(run, run.config(), reference_models, reference_dir, train=train) if reference_models else []
        with opened(run, placement=placement) as (config, data, ensemble, _):
            metrics = evaluate.ensemble_metrics(ensemble, data.get())
            logger.info("membership-inference attacks (members vs non-members, forgotten vs non-members) ...")
            metrics.update(evaluate.membership_inference(ensemble, data.get(), run.ledger().forgotten_ids(), config.seed,
                                                         probe_ids=probe_ids))
            metrics.update(run.person_privacy(worst_epsilon(metrics["epsilon_cumulative"])))
            if refs:
                probe = references.probe(run, data.get(), config.seed)
        if refs:  # the target's actors are released first; target and references predict logits in this process
            metrics["lira"] = references.attack(probe, run, refs)
        mlrun.log_summary(metrics)
    return Evaluation(metrics)


def verify(run_dir, all_shards: bool = False) -> Verification:
    """Retrain touched shards from scratch without their forgotten ids; compare bit for bit."""
    from pipeline.evaluation import evaluate

    run = resolve_run_dir(run_dir)
    with tracking.verb_run("verify", run.config(), run, optional=True) as mlrun:
        with opened(run) as (config, data, ensemble, _):
            touched = [s for s in range(config.shards.count) if all_shards or run.shard(s).manifest().version > 0]
            logger.info(f"verifying shard(s) {touched} against from-scratch retraining ...")
            test = data.get().test
            results = ensemble.verify(touched, test.x)
            report = evaluate.unlearning_report(ensemble, data.get(), run.ledger().forgotten_ids(),
                                                {s: r.pop("oracle_probs") for s, r in results.items()}, config.seed)
        stamped = receipts.record_verify(run, results)
        registry.record_verify(config, run, all(r["exact"] for r in results.values()))
        summary = Verification(exact=all(r["exact"] for r in results.values()), shards_checked=touched,
                               receipts_verified=stamped, shards=[results[s] for s in touched],
                               device=str(resolve_device(config.train.device)), unlearning=report)
        mlrun.log_summary({"exact": float(summary.exact), "shards_checked": len(touched),
                         **{f"unlearning.{k}": v for k, v in report.items()}})
    return summary


def stop(run_dir) -> Stopped:
    """Release the run's coordinator and its shard actors (kept alive by `train --keep-alive`)."""
    run = resolve_run_dir(run_dir)
    config = run.config()
    cluster.connect(config.ray)
    stopped = coordinator.stop(run, config)
    run.write_summary({**run.summary(), "keep_alive": False})
    return Stopped(run_dir=run.uri, actors_stopped=stopped)
