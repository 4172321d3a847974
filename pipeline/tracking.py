"""MLflow helpers: store resolution, one run per job, params, metrics and artifacts."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from pipeline.config import Config


def tracking_uri(config: Config) -> str:
    """config.tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite:///<home>/mlflow.db."""
    if config.tracking.uri:
        return config.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    from pipeline.runs import home

    return f"sqlite:///{home() / 'mlflow.db'}"


def numeric_metrics(summary: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten a summary into MLflow metrics: numbers as is, lists as name_i, dicts dotted."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, (int, float)) and value is not None and math.isfinite(value):
            out[name] = float(value)
        elif isinstance(value, dict):
            out.update(numeric_metrics(value, name + "."))
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) and v is not None for v in value):
            out.update({f"{name}_{i}": float(v) for i, v in enumerate(value)})
    return out


def _safe_param(value: Any) -> str:
    return "null" if value is None else str(value)[:500]


def set_experiment(config: Config) -> None:
    """Point MLflow at the store; a new experiment on a sqlite store keeps its artifacts next to
    the database file (not in the cwd, which is a temporary copy inside `ray job submit`)."""
    import mlflow

    uri = tracking_uri(config)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(config.tracking.experiment) is None and uri.startswith("sqlite:///"):
        artifacts = Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts"
        mlflow.create_experiment(config.tracking.experiment, artifact_location=artifacts.as_uri())
    mlflow.set_experiment(config.tracking.experiment)


def log_job(kind: str, config: Config, run_dir: Path, summary: dict[str, Any], parent_run_id: str | None = None) -> str | None:
    """One MLflow run for a train/forget/evaluate/verify job; returns its run id."""
    if not config.tracking.enabled:
        return None
    import mlflow

    set_experiment(config)
    tags = {"dpsisa.kind": kind, "dpsisa.run_dir": str(run_dir)}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_name=f"{kind}-{run_dir.name}", tags=tags) as run:
        mlflow.log_params({k: _safe_param(v) for k, v in config.flat().items()})
        mlflow.log_metrics(numeric_metrics(summary))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{kind}_summary.json"
            path.write_text(json.dumps(summary, indent=2, default=str))
            mlflow.log_artifact(str(path))
        for name in ("config.yaml", "recipes.json", "train_summary.json"):
            if (run_dir / name).is_file():
                mlflow.log_artifact(str(run_dir / name))
        ledger = run_dir / "ledger"
        for table in ("assignments.parquet", "requests.parquet"):
            if (ledger / table).is_file():
                mlflow.log_artifact(str(ledger / table), artifact_path="ledger")
        return run.info.run_id
