"""MLflow helpers: store resolution; one parent run per run directory with a child run per verb.

A run directory's parent run is created by `train` (its id kept in RUN_DIR/mlflow.json) and
reused by every later verb; each verb (train, forget, evaluate, verify) is a child run that
starts when the verb starts and ends when it ends (FAILED if it raises). Shard progress is
logged live to the child, one step per slice stage. A command that makes many run directories
(`score`, `audit`, `baselines`) is one `group` run, and the parent runs of the run directories it
makes are its children: command → run directory → verb. Only the driver process talks to MLflow.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.errors import RecoverableError
from pipeline.fs import Storage

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # else MLflow 3 opens a new experiment on its GenAI overview
PARENT_FILE = "mlflow.json"
STAGE_METRICS = ("loss", "accuracy_sampled", "epsilon")  # per shard, per stage: shard_{s}.<name>, step = stage
DIGEST_CHARS = 32  # MLflow's SQL stores keep a data set digest in 36 characters; the full one is an input tag
RUN_FILES = ("config.yaml", "recipes.json", "train_summary.json")
LEDGER_FILES = ("assignments.parquet", "requests.parquet")
SWEEP_TRIAL_KIND = "sweep_trial"  # dpsisa.kind of a sweep's per-trial run (pipeline/sweep/mlflow_runs.py)

# MLflow writes "View run … at: http://…" to stdout when a run on a tracking server ends: stdout is
# for the one `--json` object (and the coordinator's stdout reaches every driver through Ray's log
# forwarding). Set MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT=false to see the links again.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def tracking_uri(config: Config) -> str:
    """config.tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite:///<home>/mlflow.db."""
    if config.tracking.uri:
        return config.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    from pipeline.storage.paths import home

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


def set_experiment(config: Config) -> str:
    """Point MLflow at the store and return the experiment's id. A new experiment is tagged as
    model development, and on a sqlite store keeps its artifacts next to the database file (not
    in the cwd, which is a temporary copy inside `ray job submit`); an existing one without the
    kind tag gets it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(config)
    mlflow.set_tracking_uri(uri)
    name = config.tracking.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        artifacts = None
        if uri.startswith("sqlite:///"):
            artifacts = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
        try:
            mlflow.create_experiment(name, artifact_location=artifacts, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # another process created it first
            pass
        experiment = mlflow.get_experiment_by_name(name)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        mlflow.MlflowClient(uri).set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    mlflow.set_experiment(name)
    return experiment.experiment_id


def _params(config: Config) -> list:
    from mlflow.entities import Param

    return [Param(k, _safe_param(v)) for k, v in config.flat().items()]


def _now_ms() -> int:
    return int(time.time() * 1000)


class Untracked:
    """What a verb logs to when tracking is off: every call does nothing."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float | None], step: int = 0) -> None:
        """Log metrics at `step` now (non-finite and None values are skipped)."""

    def log_stage(self, shard: int, record: dict) -> None:
        """One shard's finished stage (a progress record of `Shard`): shard_{s}.<metric> at step = stage."""

    def log_summary(self, summary: dict[str, Any]) -> None:
        """The verb's result: flattened numeric metrics and the JSON as an artifact."""

    def log_dataset(self, config: Config, ids: np.ndarray, labels: np.ndarray, context: str = "training") -> None:
        """The private ids (and labels) the model version trained on, as an MLflow data set input."""

    def log_json(self, name: str, obj: Any) -> None:
        """A JSON artifact at `name` (e.g. receipts/REQUEST_ID.json)."""

    def log_jsons(self, objects: dict[str, Any]) -> None:
        """Many JSON artifacts (name → object) in one upload."""


class VerbRun(Untracked):
    """A verb's child run while the verb works (see `verb_run`)."""

    def __init__(self, client, run_id: str, kind: str):
        self.client, self.run_id, self.kind = client, run_id, kind
        self._stage_warned = False

    def log_metrics(self, metrics: dict[str, float | None], step: int = 0) -> None:
        from mlflow.entities import Metric

        stamp = _now_ms()
        batch = [Metric(k, float(v), stamp, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(v)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_stage(self, shard: int, record: dict) -> None:
        try:
            self.log_metrics({f"shard_{shard}.{name}": record.get(name) for name in STAGE_METRICS}, step=int(record["stage"]))
        except Exception as exc:  # noqa: BLE001 - a tracking hiccup must not abort training or a forget
            if not self._stage_warned:
                warnings.warn(f"MLflow: could not log live stage metrics ({exc}); the verb goes on", stacklevel=2)
                self._stage_warned = True

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.log_metrics(numeric_metrics(summary))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{self.kind}_summary.json"
            path.write_text(json.dumps(summary, indent=2, default=str))
            self.client.log_artifact(self.run_id, str(path))

    def log_json(self, name: str, obj: Any) -> None:
        self.log_jsons({name: obj})

    def log_jsons(self, objects: dict[str, Any]) -> None:
        """Many JSON artifacts (name → object) in one upload."""
        with tempfile.TemporaryDirectory() as tmp:
            for name, obj in objects.items():
                path = Path(tmp) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(obj, indent=2, default=str))
            self.client.log_artifacts(self.run_id, tmp)

    def log_dataset(self, config: Config, ids: np.ndarray, labels: np.ndarray, context: str = "training") -> None:
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.exceptions import MlflowException
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        from pipeline.core.train import ids_digest

        digest = ids_digest(ids)
        with warnings.catch_warnings():  # a plain name resolves to more than one kind of source
            warnings.simplefilter("ignore")
            dataset = mlflow.data.from_numpy({"sample_id": np.asarray(ids, np.int64)}, targets=np.asarray(labels),
                                             source=config.data.root or config.data.name,
                                             name=f"{config.data.name}-private", digest=digest[:DIGEST_CHARS])
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag("dpsisa.ids_digest", digest)]
        inputs = [DatasetInput(dataset._to_mlflow_entity(), tags=tags)]
        try:
            self.client.log_inputs(self.run_id, datasets=inputs)
        except MlflowException as exc:
            # Clients whose requests were applied together log the same data set (same digest) at once;
            # MLflow's SQL store checks for it, then inserts, so one of them can lose that race. The
            # data set now exists: logging it again links this run to it.
            if "UNIQUE constraint" not in str(exc) and "IntegrityError" not in str(exc):
                raise
            time.sleep(0.2)
            self.client.log_inputs(self.run_id, datasets=inputs)


def _storage(run_dir) -> Storage:
    return run_dir if isinstance(run_dir, Storage) else Storage(run_dir)


def _log_run_files(client, run_id: str, run_dir) -> None:
    """The run directory's config, recipes, train summary and ledger as they are now (copied
    through a temporary folder: the run may live on object storage)."""
    run = _storage(run_dir)
    with tempfile.TemporaryDirectory() as tmp:
        for rel, artifact_path in [(name, None) for name in RUN_FILES] + [(f"ledger/{t}", "ledger") for t in LEDGER_FILES]:
            try:
                data = run.read_bytes(rel)
            except FileNotFoundError:
                continue
            local = Path(tmp) / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(data)
            client.log_artifact(run_id, str(local), artifact_path=artifact_path)


def parent_run(client, experiment_id: str, config: Config, run_dir, new: bool = False) -> str:
    """The run directory's parent run: the one in RUN_DIR/mlflow.json if it lives in this store and
    experiment, else (or with `new`) a fresh one whose id is written there (atomically); a fresh one
    made inside a `group` is that group run's child."""
    from mlflow.exceptions import MlflowException

    run, uri = _storage(run_dir), tracking_uri(config)
    if not new and run.exists(PARENT_FILE):
        state = run.read_json(PARENT_FILE)
        if state.get("tracking_uri") == uri and state.get("experiment_id") == experiment_id:
            try:
                run = client.get_run(state["run_id"])
                if run.info.lifecycle_stage == "active":
                    return run.info.run_id
            except MlflowException:
                pass  # deleted from the store: start a new parent
    run_id = client.create_run(experiment_id, run_name=run.name, tags={
        "dpsisa.kind": "run", "dpsisa.run_dir": run.uri, **_group_parent(uri, experiment_id)}).info.run_id
    try:
        client.log_batch(run_id, params=_params(config))
        write_parent(run, run_id, experiment_id, uri)
    except BaseException:
        client.set_terminated(run_id, "FAILED")  # never left RUNNING (e.g. the run's bucket does not exist)
        raise
    return run_id


def write_parent(run_dir, run_id: str, experiment_id: str, uri: str) -> None:
    """Record `run_id` as the run directory's parent run (RUN_DIR/mlflow.json, written atomically)."""
    _storage(run_dir).write_json(PARENT_FILE, {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": uri})


class TrackingUnavailable(RecoverableError):
    """The tracking server does not answer (exit 4): `train` stops before any work; other verbs go on untracked."""
    hint = "Nothing was trained or written."
    retry_cap_s = 5.0  # a retry is one /health probe (≤ 5 s): the coordinator's release tries again this often


def unreachable(uri: str, timeout_s: float = 5.0) -> str | None:
    """Why an http(s) tracking server does not answer `/health` within `timeout_s` (None: it does,
    or the store is not a server). Checked before a verb's MLflow calls, which MLflow itself retries
    for minutes."""
    if not uri.startswith(("http://", "https://")):
        return None
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            return None
    except urllib.error.HTTPError:  # it answered (an auth proxy, an older server): reachable
        return None
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


@contextmanager
def verb_run(kind: str, config: Config, run_dir, tags: dict[str, str] | None = None,
             optional: bool = False) -> Iterator[Untracked]:
    """A child run of the run directory's parent for one verb, open while the verb runs: FINISHED
    when the block ends, FAILED (KILLED on Ctrl-C) when it raises, which is re-raised. `train`
    starts a new parent run. Yields an `Untracked` (no-op) object when tracking is off. A tracking
    server that does not answer raises TrackingUnavailable at once (not after MLflow's minutes of
    retries); with `optional` (a client verb's own bookkeeping: an erasure never waits for MLflow)
    it yields an `Untracked` instead and says so in one line on stderr. The coordinator's release
    is not optional: its registry step must happen before a request is done, so it fails and is
    retried with backoff."""
    if not config.tracking.enabled:
        yield Untracked()
        return
    uri = tracking_uri(config)
    why = unreachable(uri)
    if why is not None:
        message = (f"the MLflow tracking server at {uri} does not answer ({why}); start it, or set "
                   "tracking.enabled=false")
        if not optional:
            raise TrackingUnavailable(message)
        print(f"warning: {message}. This {kind} runs without its MLflow run.", file=sys.stderr, flush=True)
        yield Untracked()
        return
    from mlflow import MlflowClient

    experiment_id = set_experiment(config)
    client = MlflowClient(tracking_uri(config))
    parent = parent_run(client, experiment_id, config, run_dir, new=kind == "train")
    # a sweep trial's run (the parent of its run directory) keeps the trial's own status and times
    spans_verbs = client.get_run(parent).data.tags.get("dpsisa.kind") != SWEEP_TRIAL_KIND
    if spans_verbs:
        client.update_run(parent, status="RUNNING")
    run = _storage(run_dir)
    run_id = client.create_run(experiment_id, run_name=f"{kind}-{run.name}", tags={
        "dpsisa.kind": kind, "dpsisa.run_dir": run.uri, "mlflow.parentRunId": parent, **(tags or {})}).info.run_id
    client.log_batch(run_id, params=_params(config))
    status = "FAILED"
    try:
        yield VerbRun(client, run_id, kind)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            _log_run_files(client, run_id, run_dir)
        except Exception as exc:  # noqa: BLE001 - never mask the verb's own outcome (e.g. storage down)
            warnings.warn(f"MLflow: could not copy the run's files to run {run_id} ({exc.__class__.__name__}: {exc})",
                          stacklevel=2)
        finally:
            client.set_terminated(run_id, status)
            if spans_verbs:
                client.set_terminated(parent, "FAILED" if kind == "train" and status != "FINISHED" else "FINISHED")


_GROUP: ContextVar[Any] = ContextVar("dpsisa_mlflow_group", default=None)  # the open `groups.GroupRun`, if any


def _group_parent(uri: str, experiment_id: str) -> dict[str, str]:
    """The parent tag of a new run directory's parent run: the open group's run, when both share a store
    and an experiment."""
    group = _GROUP.get()
    if group is None or group.uri != uri or group.experiment_id != experiment_id:
        return {}
    return {"mlflow.parentRunId": group.run_id}
