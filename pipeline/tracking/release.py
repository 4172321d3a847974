"""The MLflow side of a forget request's release, injected into the run's coordinator (the service
layer never imports this package): for every batch of applied requests, one `forget` child run of
the run directory's parent run, with the batch's receipts and the ids the new live version trained
on, and one newly registered model version (`@live` moves to it; every version that held the
batch's ids loses its weights). Raising keeps the requests `applied`; the coordinator retries.
"""
from __future__ import annotations

from pipeline.config import Config
from pipeline.core.train import ids_digest
from pipeline.storage import receipts
from pipeline.storage.rundir import RunDir, trained_ids
from pipeline.tracking import mlflow_runs, registry


def writer_config(run: RunDir) -> Config:
    """The run's config with the tracking URI recorded in the run directory at train time: the
    writer runs inside the cluster, whose environment may name another store (or none)."""
    config = run.config()
    if config.tracking.uri or not run.exists(mlflow_runs.PARENT_FILE):
        return config
    recorded = run.read_json(mlflow_runs.PARENT_FILE).get("tracking_uri")
    return config.with_overrides({"tracking.uri": recorded}) if recorded else config


class RegistryObserver:
    """`ReleaseObserver` for the run's coordinator (picklable: it travels to the actor)."""

    def released(self, run: RunDir, request_ids: list[str]) -> dict | None:
        config = writer_config(run)
        if not config.tracking.enabled:
            return None
        batch = [r for r in (receipts.read(run, rid) for rid in request_ids) if r is not None]
        tags = {"dpsisa.requests": str(len(request_ids)), "dpsisa.writer": "coordinator"}
        with mlflow_runs.verb_run("forget", config, run, tags=tags) as mlrun:
            mlrun.log_jsons({f"{receipts.FOLDER}/{r['request_id']}.json": r for r in batch})
            ids, labels = trained_ids(run)
            mlrun.log_dataset(config, ids, labels)
            registered = registry.register_live(config, run, mlrun.run_id, ids_digest(ids), request_ids)
            mlrun.log_summary({"requests": len(request_ids), "ids": sum(len(r["sample_ids"]) for r in batch),
                               "subjects": sum(len(r["subjects"]) for r in batch), "request_ids": request_ids,
                               **(registered or {})})
        return registered
