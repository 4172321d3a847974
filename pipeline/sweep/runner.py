"""Running a sweep with Ray Tune (fresh or resumed), collecting the table and plots, and its CLI.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import pandas as pd
import ray
from ray import tune

from pipeline.evaluation import plots
from pipeline.logs import show as show_messages
from pipeline.sisa import cluster
from pipeline.sweep.mlflow_runs import ChildRunCallback, SweepTracking, open_parent
from pipeline.sweep.spec import SweepError, SweepSpec, load_spec, trial_bundles, trial_config
from pipeline.sweep.trial import run_trial, trial_metrics, trial_resources

logger = logging.getLogger(__name__)


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


def warm_pretrain_cache(spec: SweepSpec) -> None:
    """Pretrain each distinct public model once, here, so concurrent trials never train the same one twice."""
    from pipeline.core.pretrain import pretrained_model
    from pipeline.data import datasets

    loaded, seen = {}, set()
    for point in spec.points():
        config = trial_config(spec, point)
        if (key := (config.data, config.model, config.pretrain, config.seed)) in seen:
            continue
        seen.add(key)
        if config.data not in loaded:
            loaded[config.data] = datasets.load(config.data)
        pretrained_model(config, loaded[config.data])


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's grid: the same points as expand_grid (each dotted key a grid axis, plus the repeat)."""
    return {**{k: tune.grid_search(v) for k, v in spec.grid.items()},
            "repeat": tune.grid_search(list(range(spec.num_samples)))}


def _tuner(spec: SweepSpec, parent: SweepTracking | None, restore: bool) -> tune.Tuner:
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), partial(trial_resources, spec))
    tune_dir = spec.storage_path / "tune"
    if restore:
        logger.info(f"resuming sweep {spec.name} from {tune_dir} (errored trials start over)")
        return tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_errored=True)
    concurrency = max_concurrent_trials(spec, ray.cluster_resources())
    logger.info(f"sweep {spec.name}: {len(spec.points())} trials, at most {concurrency} at once, in {spec.storage_path}")
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


def run_sweep(sweep_config_path: str | Path, overrides: list[str] | None = None, resume: bool = False) -> dict:
    """Run (or, with resume, continue) a sweep; returns parent_run_id, table rows, best, storage_path, errors."""
    spec = load_spec(sweep_config_path, overrides)
    tune_dir = spec.storage_path / "tune"
    restore = resume and tune.Tuner.can_restore(str(tune_dir))
    if resume and not restore:
        logger.info(f"nothing to resume in {tune_dir}; starting the sweep")
    elif not restore and tune_dir.exists():
        raise SweepError(f"{spec.storage_path} already holds sweep '{spec.name}'; pass --resume to continue it, or set "
                         "name / storage_path in the sweep file (or delete that directory) to start a new one.")
    cluster.connect(spec.base_config.ray)
    warm_pretrain_cache(spec)
    parent = open_parent(spec, restore)
    results = _tuner(spec, parent, restore).fit()
    rows, errors, unfinished = _collect(spec, results, parent)
    table = plots.summary_table(rows)
    best = plots.best_per_cell(table)
    out = _publish(spec, table, parent, "KILLED" if unfinished else "FAILED" if errors else "FINISHED")
    logger.info(f"sweep {spec.name}: {len(rows)} trial(s) done, {len(errors)} failed, {len(unfinished)} unfinished; "
        f"table and plots in {out}")
    for error in errors:
        logger.warning(f"trial {error['trial_id']} failed: {error['error']}")
    return {"parent_run_id": parent.parent_run_id if parent else None, "table": table.to_dict("records"), "best": best,
            "storage_path": str(spec.storage_path), "errors": errors, "unfinished": unfinished}


# -- command line ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="sweep YAML, e.g. jobs/configs/sweep_digits.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the base config, e.g. train.epochs=1")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep (errored trials start over)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object (progress on stderr)")


def command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the sweep for parsed arguments; the result goes to `out` (default stdout; the CLI passes
    its real stdout, which it keeps for results alone). Returns the exit status (4 when trials failed)."""
    result = run_sweep(args.config, args.overrides, args.resume)
    out = out or sys.stdout
    if args.json:
        print(json.dumps(result, default=str), file=out, flush=True)
    else:
        print(plots.format_table(plots.summary_table(result["table"])), file=out)
        print("best strategy per (shards, ε):\n" + plots.format_best(result["best"]), file=out, flush=True)
    if result["errors"] or result["unfinished"]:
        print(f"dpsisa sweep: {len(result['errors'])} trial(s) failed, {len(result['unfinished'])} unfinished; "
              "rerun with --resume to retry them.", file=sys.stderr)
        return 4
    return 0


def main(argv: list[str] | None = None) -> None:
    """`python jobs/sweep.py SWEEP.yaml [key=value ...] [--resume]`; errors: one line, exit 3."""
    from pipeline.errors import UserError

    parser = argparse.ArgumentParser(prog="dpsisa sweep", description="Ray Tune sweep of whole dpsisa experiments.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    show_messages()  # progress on stderr
    try:
        status = command(args)
    except UserError as exc:
        print(f"dpsisa sweep: error: {exc}", file=sys.stderr)
        sys.exit(3)
    if status:
        sys.exit(status)
