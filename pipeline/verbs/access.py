"""How verbs reach a trained run: its config, its data (loaded on first use), its live ensemble
through the run's coordinator (`opened`), and the MLflow bookkeeping that hangs off a verb's life
(the live version's registration, requests completed for a crashed writer, the --no-wait backlog)."""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import numpy as np

from pipeline.config import Config
from pipeline.core.train import ids_digest
from pipeline.data import datasets
from pipeline.sisa import cluster, coordinator
from pipeline.sisa.driver import Ensemble, Placement
from pipeline.sisa.results import ForgetResult
from pipeline.storage import receipts
from pipeline.storage.rundir import RunDir, open_run, trained_ids
from pipeline.tracking import mlflow_runs as tracking
from pipeline.tracking import registry
from pipeline.tracking.release import RegistryObserver


def load_run_config(run_dir) -> Config:
    return open_run(run_dir).config()


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
        with tracking.verb_run("forget", config, run, tags={"dpsisa.completed_pending": "true"}, optional=True) as mlrun:
            mlrun.log_dataset(config, *trained_ids(run))
            mlrun.log_summary(result.to_dict())


def log_backlog(config: Config, run: RunDir) -> int:
    """Requests applied while no client waited (`forget --no-wait`) reach MLflow here: the run's
    next command logs all of them in one forget child run (their receipts as artifacts, latency
    metrics), so a burst of requests is one MLflow run, not a burst of writes. Returns how many."""
    if not config.tracking.enabled:
        return 0
    backlog = receipts.backlog(run)
    if not backlog or tracking.unreachable(tracking.tracking_uri(config)):
        return 0  # (a tracking server that does not answer: the next command logs them)
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
def opened(run_dir, placement: Placement | None = None, complete_pending: bool = True,
           timeout_s: float | None = None) -> Iterator[tuple[Config, RunData, Ensemble, coordinator.Session]]:
    """Config, lazily loaded data and the run's live ensemble: its coordinator's shard actors (warm
    when kept alive; in a Tune trial's placement group with `placement`). Pending requests a crash
    left are completed first (and logged to MLflow)."""
    run = open_run(run_dir)
    config = run.config()
    cluster.connect(config.ray)
    data = RunData(config)
    with coordinator.Session(run, config, observer=RegistryObserver(), timeout_s=timeout_s,
                             placement=placement) as session:
        if complete_pending:
            _log_completed(config, run, session.complete_pending())
        log_backlog(config, run)
        yield config, data, Ensemble.attached(run, config, session.actors), session


@contextmanager
def held(run_dir, placement: Placement | None = None) -> Iterator[None]:
    """Keep the run's coordinator and its shard actors up across the verbs run inside: each verb
    attaches to it instead of starting one and closing it when done (a Tune trial's evaluate →
    forget → evaluate start one coordinator, not three). Held by a client, not kept alive: it
    closes when this block ends, like after any other last client."""
    with opened(run_dir, placement=placement, complete_pending=False):
        yield


def worst_epsilon(epsilons: list[float | None]) -> float | None:
    """The largest ε over shards (a person lives in one shard); None without DP."""
    return None if not epsilons or None in epsilons else max(epsilons)
