"""Ray Tune sweeps: a grid over config keys where each trial is a whole experiment (train →
evaluate → forget k random ids → evaluate) with its shard actors inside the trial's placement
group; one MLflow parent run per sweep, one child run per trial, summary table and plots.
"""
from __future__ import annotations

import argparse
import difflib
import itertools
import json
import math
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import yaml
from ray import tune

from pipeline import cluster, plots, runs, tracking
from pipeline import config as config_mod
from pipeline.config import Config, ConfigError
from pipeline.ledger import Ledger

TRAINABLE_CPUS = 0.01  # the trial's own process (bundle 0); the shards share the other bundles
SPEC_KEYS = ("name", "base", "overrides", "grid", "num_samples", "forget_count", "max_concurrent_trials",
             "storage_path", "trial_cpus", "trial_gpus")
AFTER = "_after_forget"


class SweepError(ConfigError):
    """The sweep file, its grid or its storage directory is unusable; the message names the fix."""


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep file: the resolved base config, the grid and how to run it."""
    name: str
    base: dict[str, Any]  # the resolved base Config as a plain (picklable) dict
    grid: dict[str, list] = field(default_factory=dict)  # dotted config key → values
    storage_path: Path = Path(".")
    num_samples: int = 1  # repeats of the grid; repeat r runs with seed = base seed + r
    forget_count: int = 10  # random ids each trial forgets (seeded by the trial seed)
    max_concurrent_trials: int | None = None  # None: as many as the cluster holds
    trial_cpus: float = 1.0  # CPUs one trial reserves: TRAINABLE_CPUS + its shards' share
    trial_gpus: float = 0.0

    @property
    def base_config(self) -> Config:
        return config_mod.from_dict(self.base)

    def points(self) -> list[dict[str, Any]]:
        return expand_grid(self.grid, self.num_samples)


def expand_grid(grid: dict[str, list], num_samples: int = 1) -> list[dict[str, Any]]:
    """Cartesian product of the grid, × repeats: [{"privacy.epsilon": 1.0, ..., "repeat": 0}, ...]."""
    keys = list(grid)
    return [{**dict(zip(keys, values, strict=True)), "repeat": r}
            for r in range(num_samples) for values in itertools.product(*(grid[k] for k in keys))]


def _require(ok: bool, source: Path, key: str, why: str) -> None:
    if not ok:
        raise SweepError(f"sweep file {source}: '{key}' {why}")


def _base_config(raw: dict, source: Path, overrides: list[str] | None) -> Config:
    """The `base` file (next to the sweep file, else the cwd) + inline `overrides` + command-line ones."""
    base = raw.get("base")
    if base is not None:
        found = next((p for p in (source.parent / base, Path(base)) if p.is_file()), None)
        _require(found is not None, source, "base", f"names '{base}', found neither next to the sweep file nor in the cwd.")
        base = found
    inline = raw.get("overrides") or {}
    _require(isinstance(inline, dict), source, "overrides", "must map dotted config keys to values.")
    config = config_mod.load(base).with_overrides(config_mod.flatten(inline))
    return config.with_overrides(dict(config_mod.parse_override(o) for o in overrides or []))


def _storage_path(raw: dict, name: str) -> Path:
    """Absolute sweep directory: storage_path, relative ones under runs.home(); default <home>/sweeps/<name>."""
    path = Path(raw.get("storage_path") or Path("sweeps") / name).expanduser()
    return (path if path.is_absolute() else runs.home() / path).resolve()


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def load_spec(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """Parse and validate a sweep YAML; `overrides` (key=value) apply to the base config."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file '{path}' not found; pass one such as jobs/configs/sweep_digits.yaml.")
    raw = yaml.safe_load(path.read_text()) or {}
    _require(isinstance(raw, dict), path, "(top level)", "must be a mapping of sweep keys.")
    for key in raw:
        close = difflib.get_close_matches(key, SPEC_KEYS, n=1)
        _require(key in SPEC_KEYS, path, key, "is not a sweep key" + (f"; did you mean '{close[0]}'?" if close else ".")
                 + f" Known keys: {', '.join(SPEC_KEYS)}.")
    grid = raw.get("grid") or {}
    _require(isinstance(grid, dict) and bool(grid), path, "grid", "must map dotted config keys to non-empty lists.")
    for key, values in grid.items():
        _require(isinstance(values, list) and bool(values), path, f"grid.{key}", "must be a non-empty list of values.")
    name = str(raw.get("name") or path.stem)
    spec = SweepSpec(name=name, base=_base_config(raw, path, overrides).to_dict(), grid=grid,
                     storage_path=_storage_path(raw, name), num_samples=raw.get("num_samples", 1),
                     forget_count=raw.get("forget_count", 10), max_concurrent_trials=raw.get("max_concurrent_trials"),
                     trial_cpus=raw.get("trial_cpus", 1.0), trial_gpus=raw.get("trial_gpus", 0.0))
    _require(_is_count(spec.num_samples, 1), path, "num_samples", "must be an integer ≥ 1.")
    _require(_is_count(spec.forget_count, 0), path, "forget_count", "must be an integer ≥ 0.")
    _require(spec.max_concurrent_trials is None or _is_count(spec.max_concurrent_trials, 1), path,
             "max_concurrent_trials", "must be an integer ≥ 1, or null for as many as the cluster holds.")
    for key, least in (("trial_cpus", TRAINABLE_CPUS), ("trial_gpus", 0.0)):
        value = getattr(spec, key)
        _require(isinstance(value, (int, float)) and value >= least and not (key == "trial_cpus" and value == least),
                 path, key, f"must be a number {'>' if key == 'trial_cpus' else '≥'} {least:g}; got {value!r}.")
    for point in spec.points():  # every grid point must make a valid config: unknown keys are named
        try:
            trial_config(spec, point)
        except ConfigError as exc:
            raise SweepError(f"sweep file {path}: grid point {point}: {exc}") from None
    return spec


# -- one trial ------------------------------------------------------------------------------------
def _share(total: float, parts: int) -> float:
    """total / parts rounded down to Ray's resource granularity, so S shares never exceed total."""
    return math.floor(total / parts * 1e4) / 1e4


def trial_config(spec: SweepSpec, point: dict[str, Any]) -> Config:
    """Base + grid point; seed + repeat; tracking off (the sweep logs); per-shard resources pinned."""
    overrides = {k: v for k, v in point.items() if k != "repeat"}
    config = spec.base_config.with_overrides(overrides)
    shards, cpus, gpus = config.shards.count, config.ray.cpus_per_shard, config.ray.gpus_per_shard
    return config.with_overrides({
        "seed": config.seed + point.get("repeat", 0), "tracking.enabled": False,
        "ray.cpus_per_shard": cpus if cpus is not None else _share(spec.trial_cpus - TRAINABLE_CPUS, shards),
        "ray.gpus_per_shard": gpus if gpus is not None else _share(spec.trial_gpus, shards),
        # trials run in their own processes and dirs: pin the cache the driver warmed, absolutely
        "pretrain.cache_dir": str(Path(config.pretrain.cache_dir or _default_cache_root()).resolve()),
    })


def _default_cache_root() -> Path:
    from pipeline.pretrain import cache_dir

    return cache_dir(Config()).parent


def trial_bundles(spec: SweepSpec, point: dict[str, Any]) -> list[dict[str, float]]:
    """[trainable bundle] + one bundle per shard; driver.Ensemble sizes actors from bundles[1:]."""
    config = trial_config(spec, point)
    shard = {"CPU": config.ray.cpus_per_shard, **({"GPU": config.ray.gpus_per_shard} if config.ray.gpus_per_shard else {})}
    return [{"CPU": TRAINABLE_CPUS}] + [shard] * config.shards.count


def trial_resources(spec: SweepSpec, point: dict[str, Any]) -> tune.PlacementGroupFactory:
    return tune.PlacementGroupFactory(trial_bundles(spec, point))


def trial_dir(spec: SweepSpec, trial_id: str) -> Path:
    return spec.storage_path / "runs" / trial_id


def forget_ids(run_dir: Path, count: int, seed: int) -> list[int]:
    """`count` distinct private ids drawn with the trial's seed (the same ids on a rerun)."""
    ids = Ledger(run_dir).assignments()["sample_id"].to_numpy()
    return sorted(np.random.default_rng(seed).choice(ids, size=min(count, len(ids)), replace=False).tolist())


def _mia(key: str, field_name: str) -> Callable[[dict], Any]:
    return lambda summary: ((summary.get(key) or {}).get("posterior") or {}).get(field_name)


def _max_epsilon(summary: dict) -> float | None:
    spent = [e for e in summary.get("epsilon_spent") or [] if e is not None]
    return max(spent) if spent else None


# metric name → how to read it from an evaluate summary (absent values are skipped)
EVALUATION_METRICS: dict[str, Callable[[dict], Any]] = {
    "accuracy": lambda s: s.get("accuracy"),
    "vote_accuracy": lambda s: s.get("vote_accuracy"),
    "ece": lambda s: s.get("ece"),
    "epsilon_spent_max": _max_epsilon,
    "epsilon_lower_bound": lambda s: s.get("epsilon_lower_bound"),
    **{f"mia_{f}": _mia("mia", f) for f in ("advantage", "auc", "tpr_at_1pct_fpr")},
    **{f"mia_forgotten_{f}": _mia("mia_forgotten", f) for f in ("advantage", "auc", "tpr_at_1pct_fpr")},
}
FORGET_METRICS: dict[str, Callable[[dict], Any]] = {
    "forget_seconds": lambda r: r["seconds"],
    "forget_speedup": lambda r: r["speedup"],
    "shards_retrained": lambda r: len(r["shards_retrained"]),
    "stages_replayed": lambda r: sum(int(v) for v in r["slices_retrained"].values()),
}


def _pick(registry: dict[str, Callable[[dict], Any]], summary: dict, suffix: str = "") -> dict[str, float]:
    values = {name + suffix: read(summary) for name, read in registry.items()}
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def evaluation_metrics(summary: dict, suffix: str = "") -> dict[str, float]:
    """Flat trial metrics from an evaluate summary (MIA ones once evaluate reports `mia`)."""
    return _pick(EVALUATION_METRICS, summary, suffix)


def forget_metrics(result: dict) -> dict[str, float]:
    return _pick(FORGET_METRICS, result)


def run_trial(point: dict[str, Any], spec: SweepSpec) -> None:
    """Tune trainable: one whole experiment in its own run dir, reported once via tune.report."""
    config = trial_config(spec, point)
    trial_id = tune.get_context().get_trial_id()
    run_dir = trial_dir(spec, trial_id)
    shutil.rmtree(run_dir, ignore_errors=True)  # a retried (resumed) trial starts over

    def log(message: str) -> None:
        print(f"[{trial_id}] {message}", flush=True)

    placement = ray.util.get_current_placement_group()
    trained = runs.train(config, run_dir, log=log, placement=placement)
    doomed = forget_ids(run_dir, spec.forget_count, config.seed) if spec.forget_count else None
    # before forgetting, the ids to forget are attacked as `mia_forgotten` (still members)
    metrics = {**evaluation_metrics(runs.evaluate_run(run_dir, log, placement=placement, probe_ids=doomed)),
               "full_train_seconds": float(trained["full_train_seconds"])}
    if doomed:
        forgot = runs.forget(run_dir, doomed, log, placement=placement)
        metrics.update(forget_metrics(forgot))
        metrics.update(evaluation_metrics(runs.evaluate_run(run_dir, log, placement=placement), AFTER))
    tune.report(metrics)


def trial_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The metrics a trial reported, without Tune's bookkeeping keys."""
    names = set(EVALUATION_METRICS) | set(FORGET_METRICS) | {"full_train_seconds"}
    names |= {n + AFTER for n in EVALUATION_METRICS}
    return {k: float(v) for k, v in result.items() if k in names and isinstance(v, (int, float))}


# -- MLflow: one parent run per sweep, one child run per trial -------------------------------------
def _param(value: Any) -> str:
    return "null" if value is None else str(value)[:500]


@dataclass(frozen=True)
class SweepTracking:
    """Where the sweep's runs live; plain strings, so Tune can pickle the callback for a resume."""
    uri: str
    experiment_id: str
    parent_run_id: str

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)

    def log_trial(self, spec: SweepSpec, trial_id: str, point: dict[str, Any], metrics: dict[str, float],
                  error: str | None = None) -> str:
        """Create or update this trial's one child run (idempotent: a resumed trial reuses it)."""
        from mlflow.entities import Metric, Param, RunTag

        client = self.client()
        found = client.search_runs([self.experiment_id], filter_string=(
            f"tags.mlflow.parentRunId = '{self.parent_run_id}' and tags.`dpsisa.trial_id` = '{trial_id}'"))
        tags = {"dpsisa.kind": "sweep_trial", "dpsisa.sweep": spec.name, "dpsisa.trial_id": trial_id,
                "dpsisa.repeat": str(point.get("repeat", 0)), "dpsisa.run_dir": str(trial_dir(spec, trial_id))}
        if found:
            run_id = found[0].info.run_id
            if not error and "dpsisa.error" in found[0].data.tags:  # a failed trial that a resume completed
                client.delete_tag(run_id, "dpsisa.error")
        else:
            run_id = client.create_run(self.experiment_id, run_name=f"{spec.name}-{trial_id}",
                                       tags={**tags, "mlflow.parentRunId": self.parent_run_id}).info.run_id
            params = trial_config(spec, point).flat()
            client.log_batch(run_id, params=[Param(k, _param(v)) for k, v in params.items()])
        stamp = int(pd.Timestamp.now().timestamp() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, stamp, 0) for k, v in metrics.items()],
                         tags=[RunTag("dpsisa.error", error)] if error else [])
        client.set_terminated(run_id, "FAILED" if error else "FINISHED")
        return run_id


def open_parent(spec: SweepSpec, resume: bool) -> SweepTracking | None:
    """The sweep's parent run: reopened on resume (id kept in <storage>/sweep.json), else created."""
    config = spec.base_config
    if not config.tracking.enabled:
        return None
    import mlflow
    from mlflow.entities import Param

    tracking.set_experiment(config)
    uri, state_path = tracking.tracking_uri(config), spec.storage_path / "sweep.json"
    experiment_id = mlflow.get_experiment_by_name(config.tracking.experiment).experiment_id
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if resume and state.get("tracking_uri") == uri:
        parent = SweepTracking(uri, experiment_id, state["parent_run_id"])
        parent.client().update_run(parent.parent_run_id, status="RUNNING")
        return parent
    client = mlflow.tracking.MlflowClient(uri)
    run_id = client.create_run(experiment_id, run_name=f"sweep-{spec.name}", tags={
        "dpsisa.kind": "sweep", "dpsisa.sweep": spec.name, "dpsisa.storage_path": str(spec.storage_path)}).info.run_id
    params = {k: v for k, v in config.flat().items() if k not in spec.grid}
    params.update({"sweep.grid": json.dumps(spec.grid), "sweep.num_samples": spec.num_samples,
                   "sweep.trials": len(spec.points()), "sweep.forget_count": spec.forget_count,
                   "sweep.trial_cpus": spec.trial_cpus})
    client.log_batch(run_id, params=[Param(k, _param(v)) for k, v in params.items()])
    spec.storage_path.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps({"parent_run_id": run_id, "tracking_uri": uri}))
    return SweepTracking(uri, experiment_id, run_id)


class ChildRunCallback(tune.Callback):
    """Logs every finished or failed trial as a child run while the sweep goes on (driver side,
    so trials never need the tracking store)."""

    def __init__(self, spec: SweepSpec, parent: SweepTracking):
        self.spec, self.parent = spec, parent

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.parent.log_trial(self.spec, trial.trial_id, trial.config, trial_metrics(trial.last_result or {}))

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.parent.log_trial(self.spec, trial.trial_id, trial.config, {},
                              error=f"trial failed; traceback in {getattr(trial, 'path', None)}")


# -- the sweep ----------------------------------------------------------------------------------
def max_concurrent_trials(spec: SweepSpec, resources: dict[str, float]) -> int:
    """As many trials as the cluster holds at once (or the sweep's own limit); fail fast if none fits."""
    needs = [{k: sum(b.get(k, 0.0) for b in trial_bundles(spec, p)) for k in ("CPU", "GPU")} for p in spec.points()]
    need = {k: max(n[k] for n in needs) for k in ("CPU", "GPU")}
    for key, amount in need.items():
        if amount > resources.get(key, 0.0) + 1e-9:
            raise SweepError(f"a trial needs {amount:g} {key} but the cluster has {resources.get(key, 0.0):g}; lower "
                             "trial_cpus / trial_gpus or ray.cpus_per_shard in the sweep file, or add nodes.")
    fits = min(math.floor(resources[k] / a + 1e-9) for k, a in need.items() if a > 0)
    return spec.max_concurrent_trials or max(1, fits)


def warm_pretrain_cache(spec: SweepSpec, log: Callable) -> None:
    """Pretrain each distinct public model once, here, so concurrent trials never train the same one twice."""
    from pipeline.data import datasets
    from pipeline.pretrain import pretrained_model

    loaded, seen = {}, set()
    for point in spec.points():
        config = trial_config(spec, point)
        if (key := (config.data, config.model, config.pretrain, config.seed)) in seen:
            continue
        seen.add(key)
        if config.data not in loaded:
            loaded[config.data] = datasets.load(config.data)
        pretrained_model(config, loaded[config.data], log)


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's grid: the same points as expand_grid (each dotted key a grid axis, plus the repeat)."""
    return {**{k: tune.grid_search(v) for k, v in spec.grid.items()},
            "repeat": tune.grid_search(list(range(spec.num_samples)))}


def _tuner(spec: SweepSpec, parent: SweepTracking | None, restore: bool, log: Callable) -> tune.Tuner:
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), partial(trial_resources, spec))
    tune_dir = spec.storage_path / "tune"
    if restore:
        log(f"resuming sweep {spec.name} from {tune_dir} (errored trials start over)")
        return tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_errored=True)
    concurrency = max_concurrent_trials(spec, ray.cluster_resources())
    log(f"sweep {spec.name}: {len(spec.points())} trials, at most {concurrency} at once, in {spec.storage_path}")
    return tune.Tuner(trainable, param_space=param_space(spec),
                      tune_config=tune.TuneConfig(max_concurrent_trials=concurrency),
                      run_config=tune.RunConfig(name="tune", storage_path=str(spec.storage_path), verbose=1,
                                                callbacks=[ChildRunCallback(spec, parent)] if parent else []))


def _collect(spec: SweepSpec, results, parent: SweepTracking | None) -> tuple[list[dict], list[dict], list[str]]:
    """Summary rows of the finished trials, errors of the failed ones, ids of unfinished ones (interrupted)."""
    rows, errors, unfinished = [], [], []
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        if result.error is not None:
            errors.append({"trial_id": trial_id, "error": f"{type(result.error).__name__}: {result.error}"[:500]})
            continue
        metrics = trial_metrics(result.metrics or {})
        if "accuracy" not in metrics:
            unfinished.append(trial_id)
            continue
        flat = trial_config(spec, result.config).flat()
        keys = dict.fromkeys([*plots.KEY_COLUMNS, *spec.grid])
        rows.append({"trial_id": trial_id, "repeat": result.config.get("repeat", 0), **{k: flat[k] for k in keys},
                     **metrics})
        if parent:  # idempotent; covers a trial that finished just before an interruption
            parent.log_trial(spec, trial_id, result.config, metrics)
    return rows, errors, unfinished


def _publish(spec: SweepSpec, table: pd.DataFrame, parent: SweepTracking | None, status: str) -> Path:
    """Write the table (CSV, Parquet) and the plots under <storage>/summary; attach them to the parent run."""
    out = spec.storage_path / "summary"
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "summary.csv", index=False)
    table.to_parquet(out / "summary.parquet", index=False)
    paths = [out / "summary.csv", out / "summary.parquet", *plots.save_all(table, out)]
    if parent:
        from mlflow.entities import Metric

        client, stamp = parent.client(), int(pd.Timestamp.now().timestamp() * 1000)
        for path in paths:
            client.log_artifact(parent.parent_run_id, str(path))
        client.log_batch(parent.parent_run_id, metrics=[Metric("trials_completed", len(table), stamp, 0)])
        client.set_terminated(parent.parent_run_id, status)
    return out


def run_sweep(sweep_config_path: str | Path, overrides: list[str] | None = None, resume: bool = False,
              log: Callable = print) -> dict:
    """Run (or, with resume, continue) a sweep; returns parent_run_id, table rows, best, storage_path, errors."""
    spec = load_spec(sweep_config_path, overrides)
    tune_dir = spec.storage_path / "tune"
    restore = resume and tune.Tuner.can_restore(str(tune_dir))
    if resume and not restore:
        log(f"nothing to resume in {tune_dir}; starting the sweep")
    elif not restore and tune_dir.exists():
        raise SweepError(f"{spec.storage_path} already holds sweep '{spec.name}'; pass --resume to continue it, or set "
                         "name / storage_path in the sweep file (or delete that directory) to start a new one.")
    cluster.connect(spec.base_config.ray, log)
    warm_pretrain_cache(spec, log)
    parent = open_parent(spec, restore)
    results = _tuner(spec, parent, restore, log).fit()
    rows, errors, unfinished = _collect(spec, results, parent)
    table = plots.summary_table(rows)
    best = plots.best_per_cell(table)
    out = _publish(spec, table, parent, "KILLED" if unfinished else "FAILED" if errors else "FINISHED")
    log(f"sweep {spec.name}: {len(rows)} trial(s) done, {len(errors)} failed, {len(unfinished)} unfinished; "
        f"table and plots in {out}")
    log(plots.format_table(table))
    log("best strategy per (shards, ε):\n" + plots.format_best(best))
    for error in errors:
        log(f"trial {error['trial_id']} failed: {error['error']}")
    return {"parent_run_id": parent.parent_run_id if parent else None, "table": table.to_dict("records"), "best": best,
            "storage_path": str(spec.storage_path), "errors": errors, "unfinished": unfinished}


# -- command line ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="sweep YAML, e.g. jobs/configs/sweep_digits.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the base config, e.g. train.epochs=1")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep (errored trials start over)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object (progress on stderr)")


def command(args: argparse.Namespace) -> int:
    """Run the sweep for parsed arguments; returns the exit status (4 when trials failed)."""
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else print
    result = run_sweep(args.config, args.overrides, args.resume, log)
    if args.json:
        print(json.dumps(result, default=str))
    if result["errors"] or result["unfinished"]:
        print(f"dpsisa sweep: {len(result['errors'])} trial(s) failed, {len(result['unfinished'])} unfinished; "
              "rerun with --resume to retry them.", file=sys.stderr)
        return 4
    return 0


def main(argv: list[str] | None = None) -> None:
    """`python jobs/sweep.py SWEEP.yaml [key=value ...] [--resume]`; errors: one line, exit 3."""
    from pipeline.errors import USER_ERRORS

    parser = argparse.ArgumentParser(prog="dpsisa sweep", description="Ray Tune sweep of whole dpsisa experiments.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        status = command(args)
    except USER_ERRORS as exc:
        print(f"dpsisa sweep: error: {exc}", file=sys.stderr)
        sys.exit(3)
    if status:
        sys.exit(status)
