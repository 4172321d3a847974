"""MLflow for sweeps: one parent run per sweep, one child run per trial (driver side); a finished
trial's child run is also its run directory's parent run, so later verbs there nest under it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pandas as pd
from ray import tune

from pipeline.storage.rundir import RunDir
from pipeline.sweep.spec import SweepSpec, trial_config, trial_dir
from pipeline.sweep.trial import trial_metrics
from pipeline.tracking import mlflow_runs as tracking


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
        tags = {"dpsisa.kind": tracking.SWEEP_TRIAL_KIND, "dpsisa.sweep": spec.name, "dpsisa.trial_id": trial_id,
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
        if not error:
            self.adopt_run_dir(spec, trial_id, run_id)
        return run_id

    def adopt_run_dir(self, spec: SweepSpec, trial_id: str, run_id: str) -> None:
        """Make the trial's child run its run directory's parent run, and turn tracking on (this store)
        in the run's config: later verbs on the trial's run directory (`dpsisa evaluate --run-dir ...`)
        become children of the trial's run, sweep → trial → verb. Trials themselves track nothing."""
        run = RunDir(trial_dir(spec, trial_id))
        if not run.is_run():  # the trial failed before writing its config
            return
        run.write_config(run.config().with_overrides({"tracking.enabled": True, "tracking.uri": self.uri}))
        tracking.write_parent(run, run_id, self.experiment_id, self.uri)


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


