"""What each user-facing verb does, over a run directory. The CLI, the `jobs/` wrappers, the
benchmarks and the sweep all call these functions.

RUN_DIR layout: config.yaml (resolved), recipes.json (per-shard DP recipe), pretrained.pt,
train_summary.json, ledger/ (Parquet), shards/shard_XXX/ (manifest + stage checkpoints).
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np
import yaml

from pipeline import cluster, evaluate, models, tracking
from pipeline import config as config_mod
from pipeline.checkpoints import ShardStore, atomic_write, atomic_write_json, load_torch, save_torch
from pipeline.config import Config
from pipeline.data import datasets
from pipeline.data.partition import partition
from pipeline.driver import Ensemble
from pipeline.ledger import Ledger
from pipeline.pretrain import pretrained_model
from pipeline.privacy import make_recipe
from pipeline.train import resolve_device


class RunError(RuntimeError):
    """The run directory is missing, incomplete or already used."""


def home() -> Path:
    """Where relative run dirs and the default MLflow store live: $DPSISA_HOME, else ~/dpsisa
    inside a `ray job submit` entrypoint (its cwd is a temporary copy), else the cwd."""
    if os.environ.get("DPSISA_HOME"):
        return Path(os.environ["DPSISA_HOME"]).expanduser()
    return Path.home() / "dpsisa" if cluster.in_ray_job() else Path.cwd()


def resolve_run_dir(run_dir: str | Path | None, config: Config | None = None) -> Path:
    if run_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{stamp}-{config.data.name}-S{config.shards.count}R{config.shards.slices}"
    path = Path(run_dir).expanduser()
    return (path if path.is_absolute() else home() / path).resolve()


def load_run_config(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a dpsisa run directory (no config.yaml); pass the --run-dir printed by `dpsisa train`.")
    return config_mod.load(path)


def _check_private_rows(data: datasets.Data) -> None:
    if not np.array_equal(data.private.ids, np.arange(len(data.private.ids))):
        raise RunError("private sample ids must equal their row positions; this data split is not supported.")


def _pretrained_from_run(run_dir: Path, config: Config, data: datasets.Data) -> models.Classifier:
    model = models.build(config.model.name, data.input_shape, data.num_classes, config.model.width, config.seed)
    model.load_state_dict(load_torch(run_dir / "pretrained.pt"))
    return model.eval()


class RunData:
    """The run's data set, loaded on first use (warm actors do not need it for a forget)."""

    def __init__(self, run_dir: Path, config: Config):
        self.run_dir, self.config, self._data = run_dir, config, None

    def get(self) -> datasets.Data:
        if self._data is None:
            self._data = datasets.load(self.config.data)
        return self._data

    def with_model(self) -> tuple[datasets.Data, models.Classifier]:
        return self.get(), _pretrained_from_run(self.run_dir, self.config, self.get())


def trained_ids(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) the live model version trained on: the ledger's assignments less done forgets."""
    table = Ledger(run_dir).assignments()
    ids, labels = table["sample_id"].to_numpy(), table["label"].to_numpy()
    keep = ~np.isin(ids, np.fromiter(Ledger(run_dir).forgotten_ids(), np.int64))
    return ids[keep], labels[keep]


def complete_pending(ensemble: Ensemble, config: Config, run_dir: Path, log: Callable) -> None:
    """Finish requests a crash left pending; each becomes a forget child run in MLflow."""
    for request_id, ids in ensemble.ledger.pending().items():
        with tracking.verb_run("forget", config, run_dir, tags={"dpsisa.completed_pending": "true"}) as run:
            summary = ensemble.complete_request(request_id, ids, log, on_stage=run.log_stage)
            run.log_dataset(config, *trained_ids(run_dir))
            run.log_summary(summary)


@contextmanager
def opened(run_dir: Path, log: Callable = print, placement=None) -> Iterator[tuple[Config, RunData, Ensemble]]:
    """Config, lazily loaded data and a live ensemble for an existing run (warm actors if kept alive)."""
    config = load_run_config(run_dir)
    cluster.connect(config.ray, log)
    data = RunData(run_dir, config)
    recipes = json.loads((run_dir / "recipes.json").read_text())
    keep_alive = json.loads((run_dir / "train_summary.json").read_text()).get("keep_alive", False)
    ensemble = Ensemble.start(run_dir, config, data.with_model, recipes, keep_alive=keep_alive, placement=placement, log=log)
    try:
        yield config, data, ensemble
    finally:
        ensemble.shutdown()


def train(config: Config, run_dir: Path, keep_alive: bool = False, log: Callable = print, placement=None,
          exclude_ids: list[int] | None = None) -> dict:
    """Partition, pretrain (cached), calibrate DP, train all shards in parallel, evaluate, track.

    `exclude_ids` leaves private ids out of the partition altogether: the retrain-from-scratch
    oracle that unlearning scores compare against (the ledger then does not know those ids)."""
    if (run_dir / "config.yaml").exists():
        raise RunError(f"run directory {run_dir} already holds a run; choose a new --run-dir.")
    run_dir.mkdir(parents=True, exist_ok=True)
    with tracking.verb_run("train", config, run_dir) as run:
        started = time.perf_counter()
        local = cluster.connect(config.ray, log)
        if keep_alive and local:
            log("warning: --keep-alive on a local Ray cluster: actors die with this process; use `ray start --head`.")
        data = datasets.load(config.data)
        _check_private_rows(data)
        log(f"data: {config.data.name}: {len(data.private.y)} private, {len(data.public.y)} public, {len(data.test.y)} test samples")
        ids = data.private.ids
        excluded = sorted(set(exclude_ids or ()))
        if excluded:
            unknown = [i for i in excluded if not 0 <= i < len(ids)]
            if unknown:
                raise RunError(f"exclude_ids {unknown[:5]} are not private sample ids (0..{len(ids) - 1}).")
            ids = np.setdiff1d(ids, np.asarray(excluded, dtype=ids.dtype))
            log(f"excluding {len(excluded)} private id(s) from training (retrain-from-scratch oracle)")
        columns = partition(ids, data.private.y[ids], config.shards.count, config.shards.slices,
                            config.partition.strategy, config.seed, data.private.x[ids])
        ledger = Ledger(run_dir)
        ledger.write_assignments({**columns, "label": data.private.y[columns["sample_id"]]})
        model, pretrain_info = pretrained_model(config, data, log)
        save_torch(run_dir / "pretrained.pt", model.state_dict())
        recipes = [make_recipe(config, s, [len(ids) for ids in ledger.shard_slices(s)]).to_dict()
                   for s in range(config.shards.count)]
        if config.privacy.epsilon is not None:
            log(f"DP: ε={config.privacy.epsilon}, δ={config.privacy.delta}, σ per shard "
                f"{sorted({round(r['noise_multiplier'], 3) for r in recipes})} over {config.shards.slices} slice stages")
        atomic_write_json(run_dir / "recipes.json", recipes)
        atomic_write(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
        ensemble = Ensemble.start(run_dir, config, lambda: (data, model), recipes, keep_alive=keep_alive,
                                  placement=placement, log=log)
        try:
            fit_start = time.perf_counter()
            log(f"training {config.shards.count} shards × {config.shards.slices} slices "
                f"({config.finetune.strategy}, {'ε=' + str(config.privacy.epsilon) if recipes[0]['noise_multiplier'] else 'no DP'})")
            per_shard = ensemble.fit(log, on_stage=run.log_stage)
            full_train_seconds = time.perf_counter() - fit_start
            atomic_write_json(run_dir / "train_summary.json", {
                "full_train_seconds": full_train_seconds, "shard_seconds": [per_shard[s]["seconds"] for s in sorted(per_shard)],
                "keep_alive": keep_alive, "pretrain": pretrain_info, "excluded_ids": excluded})
            metrics = evaluate.ensemble_metrics(ensemble, data)
        finally:
            ensemble.shutdown()
        summary = {"run_dir": str(run_dir), "full_train_seconds": full_train_seconds,
                   "total_seconds": time.perf_counter() - started, **metrics}
        run.log_dataset(config, *trained_ids(run_dir))
        run.log_summary(summary)
    return summary


def forget(run_dir: Path, ids: list[int], log: Callable = print, placement=None) -> dict:
    config = load_run_config(run_dir)
    Ledger(run_dir).validate(ids)  # fail fast, before any actor starts (re-checked under the lock)
    with tracking.verb_run("forget", config, run_dir) as run:
        with opened(run_dir, log, placement=placement) as (config, data, ensemble):
            complete_pending(ensemble, config, run_dir, log)
            result = ensemble.forget(ids, log, on_stage=run.log_stage)
        result["full_train_seconds"] = json.loads((run_dir / "train_summary.json").read_text())["full_train_seconds"]
        result["speedup"] = result["full_train_seconds"] / max(result["seconds"], 1e-9)
        replayed, total = replay_work(json.loads((run_dir / "recipes.json").read_text()), result["from_stage"])
        result.update(samples_processed=replayed, full_train_samples=total, work_fraction=replayed / total)
        run.log_dataset(config, *trained_ids(run_dir))
        run.log_summary(result)
    return result


def predict(run_dir: Path, inputs: dict[str, np.ndarray], log: Callable = print) -> dict[str, np.ndarray]:
    """(N, C) ensemble probabilities of the live (unlearned) ensemble for each named input array."""
    with opened(run_dir, log) as (config, _, ensemble):
        complete_pending(ensemble, config, run_dir, log)
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


def serve(run_dir: Path, images: np.ndarray, log: Callable = print) -> dict:
    """`dpsisa predict`: classes and mean-softmax probabilities of the live ensemble, and the model
    version of every shard that made them (pending requests are completed first)."""
    with opened(run_dir, log) as (config, data, ensemble):
        complete_pending(ensemble, config, run_dir, log)
        x = prepare_input(config.data.name, images, data.get().input_shape)
        versions = [ensemble.status()[s]["version"] for s in range(config.shards.count)]
        probs = ensemble.predict_mean(x)
        if [ensemble.status()[s]["version"] for s in range(config.shards.count)] != versions:
            raise RunError("the ensemble changed while predicting (a forget committed meanwhile); run predict again.")
    return {"run_dir": str(run_dir), "predictions": probs.argmax(axis=1).tolist(), "probabilities": probs.tolist(),
            "model_versions": versions, "pending_requests": sorted(Ledger(run_dir).pending())}


def replay_work(recipes: list[dict], from_stage: dict[str, int | None]) -> tuple[float, float]:
    """(replayed, total) SGD sample-steps (steps × expected batch) of a forget versus full training:
    SISA's cost model — an id in an early slice forces replaying almost the whole shard."""
    def work(recipe: dict, first: int) -> float:
        return sum(s["steps"] * recipe["batch_size"] for s in recipe["stages"][first:])

    total = sum(work(r, 0) for r in recipes)
    replayed = sum(work(recipes[int(s)], k) for s, k in from_stage.items() if k is not None)
    return replayed, total


def evaluate_run(run_dir: Path, log: Callable = print, placement=None, probe_ids: list[int] | None = None) -> dict:
    """Test metrics and membership-inference attacks; `probe_ids` (e.g. ids about to be
    forgotten) are attacked in place of the forgotten ids."""
    with tracking.verb_run("evaluate", load_run_config(run_dir), run_dir) as run:
        with opened(run_dir, log, placement=placement) as (config, data, ensemble):
            complete_pending(ensemble, config, run_dir, log)
            metrics = evaluate.ensemble_metrics(ensemble, data.get())
            log("membership-inference attacks (members vs non-members, forgotten vs non-members) ...")
            metrics.update(evaluate.membership_inference(ensemble, data.get(), Ledger(run_dir).forgotten_ids(), config.seed,
                                                         probe_ids=probe_ids))
        run.log_summary(metrics)
    return metrics


def verify(run_dir: Path, all_shards: bool = False, log: Callable = print) -> dict:
    """Retrain touched shards from scratch without their forgotten ids; compare bit for bit."""
    with tracking.verb_run("verify", load_run_config(run_dir), run_dir) as run:
        with opened(run_dir, log) as (config, data, ensemble):
            complete_pending(ensemble, config, run_dir, log)
            touched = [s for s in range(config.shards.count) if all_shards or ShardStore(run_dir, s).manifest().version > 0]
            log(f"verifying shard(s) {touched} against from-scratch retraining ...")
            test = data.get().test
            results = ensemble.verify(touched, test.x, log=log)
            report = evaluate.unlearning_report(ensemble, data.get(), Ledger(run_dir).forgotten_ids(),
                                                {s: r.pop("oracle_probs") for s, r in results.items()}, config.seed)
        summary = {"exact": all(r["exact"] for r in results.values()), "shards_checked": touched,
                   "shards": [results[s] for s in touched], "device": str(resolve_device(config.train.device)),
                   "unlearning": report}
        run.log_summary({"exact": float(summary["exact"]), "shards_checked": len(touched),
                         **{f"unlearning.{k}": v for k, v in report.items()}})
    return summary


def status(run_dir: Path, log: Callable = print) -> dict:
    """Read from disk; starts actors only to complete a pending request."""
    config = load_run_config(run_dir)
    ledger = Ledger(run_dir)
    if ledger.pending():
        with opened(run_dir, log) as (_, _, ensemble):
            complete_pending(ensemble, config, run_dir, log)
    requests = ledger.requests()
    by_request: dict[str, dict] = {}
    for rid, st in zip(requests["request_id"].to_pylist(), requests["status"].to_pylist()):
        entry = by_request.setdefault(rid, {"request_id": rid, "status": st, "ids": 0})
        entry["ids"] += 1
    shards = []
    for s in range(config.shards.count):
        m = ShardStore(run_dir, s).manifest()
        shards.append({"shard": s, "version": m.version, "forgotten": len(m.forgotten), "samples": m.stages[-1]["samples"],
                       "epsilon": m.releases[-1]["epsilon"], "epsilon_cumulative": m.releases[-1]["epsilon_cumulative"],
                       "releases": len(m.releases)})
    return {"run_dir": str(run_dir), "shards": shards,
            "pending": [r for r in by_request.values() if r["status"] == "pending"],
            "done": [r for r in by_request.values() if r["status"] == "done"],
            "epsilon_target": config.privacy.epsilon, "delta": config.privacy.delta}


def stop(run_dir: Path, log: Callable = print) -> dict:
    """Release the detached actors (and placement group) that `train --keep-alive` left running."""
    config = load_run_config(run_dir)
    cluster.connect(config.ray, log)
    stopped = Ensemble.stop_detached(run_dir, config)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    atomic_write_json(run_dir / "train_summary.json", {**summary, "keep_alive": False})
    return {"run_dir": str(run_dir), "actors_stopped": stopped}
