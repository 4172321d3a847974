"""Group runs: one MLflow run for a command that makes many run directories (`score`, `audit`,
`baselines`). The parent runs of the run directories it makes are its children (command → run
directory → verb: `mlflow_runs.parent_run` asks the open group through `mlflow_runs._GROUP`)."""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.config import Config
from pipeline.tracking.mlflow_runs import (
    _GROUP,
    Untracked,
    VerbRun,
    _log_run_files,
    _now_ms,
    _params,
    _safe_param,
    _storage,
    set_experiment,
    tracking_uri,
)


class GroupRun(VerbRun):
    """The one run of a command that makes many run directories (see `group`). It is created on
    first use (a run directory's parent, the result) with the command's start time, so a request
    refused before any work leaves no run behind; params are logged when it ends."""

    def __init__(self, kind: str, config: Config, out_dir=None):
        self.kind, self.config, self.out = kind, config, None if out_dir is None else _storage(out_dir)
        self.uri, self.started, self._stage_warned = tracking_uri(config), _now_ms(), False
        self._run_id: str | None = None

    @functools.cached_property
    def experiment_id(self) -> str:
        return set_experiment(self.config)

    @functools.cached_property
    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.uri)

    @property
    def run_id(self) -> str:
        if self._run_id is None:
            tags = {"dpsisa.kind": self.kind, **({"dpsisa.run_dir": self.out.uri} if self.out else {})}
            self._run_id = self.client.create_run(self.experiment_id, start_time=self.started, tags=tags,
                                                  run_name=f"{self.kind}-{self.out.name}" if self.out else self.kind).info.run_id
        return self._run_id

    def log_job(self, config: Config, run_dir, summary: dict[str, Any]) -> None:
        """The command's result: numeric metrics and the summary JSON, the files of `run_dir` (see
        RUN_FILES), and `config` as the params."""
        self.config, run = config, _storage(run_dir)
        if self.out is None:
            self.out = run
            self.client.update_run(self.run_id, name=f"{self.kind}-{run.name}")
            self.client.set_tag(self.run_id, "dpsisa.run_dir", run.uri)
        self.log_summary(summary)
        _log_run_files(self.client, self.run_id, run)

    def log_child(self, name: str, tags: dict[str, str], params: dict[str, Any], metrics: dict[str, float],
                  artifacts: dict[str, Any]) -> str:
        """A finished child run of this one for one part of the result (e.g. a method of `baselines`):
        its params, metrics and JSON artifacts (name → object). Returns its id."""
        from mlflow.entities import Param

        run_id = self.client.create_run(self.experiment_id, run_name=name, tags={
            **tags, "mlflow.parentRunId": self.run_id}).info.run_id
        self.client.log_batch(run_id, params=[Param(k, _safe_param(v)) for k, v in params.items()])
        child = VerbRun(self.client, run_id, tags.get("dpsisa.kind", self.kind))
        child.log_metrics(metrics)
        child.log_jsons(artifacts)
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def end(self, status: str) -> None:
        if self._run_id is None:
            return
        try:
            self.client.log_batch(self._run_id, params=_params(self.config))
        finally:
            self.client.set_terminated(self._run_id, status)


@contextmanager
def group(kind: str, config: Config, out_dir=None) -> Iterator[Untracked]:
    """One run for a command that makes many run directories, open while the command runs: every
    run directory's parent run created meanwhile (by `train`) is its child, and `log_job` logs the
    command's result into it. FINISHED when the block ends, FAILED (KILLED on Ctrl-C) when it raises.
    Yields an `Untracked` (no-op) object when tracking is off."""
    if not config.tracking.enabled:
        yield Untracked()
        return
    run = GroupRun(kind, config, out_dir)
    token = _GROUP.set(run)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _GROUP.reset(token)
        run.end(status)


def start_group() -> None:
    """Create the open group's run now, so that it shows as RUNNING while the work goes on (call it
    once the command's request has passed its checks); without a group, nothing."""
    current = _GROUP.get()
    if current is not None:
        current.run_id  # noqa: B018 - the property creates the run


def grouped(kind: str, out_dir: str = "out_dir") -> Callable:
    """Decorator: run a command function inside `group(kind, <its config>, <its argument named out_dir>)`."""
    def decorate(function: Callable) -> Callable:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with group(kind, bound.arguments["config"], bound.arguments.get(out_dir)):
                return function(*args, **kwargs)
        return wrapper
    return decorate


def log_job(kind: str, config: Config, run_dir, summary: dict[str, Any]) -> str | None:
    """A whole job's result (e.g. `score`): into the open `group` run of the same kind, else into a run
    of its own logged after the fact. Returns the run's id (None when tracking is off)."""
    if not config.tracking.enabled:
        return None
    current = _GROUP.get()
    if current is not None and current.kind == kind:
        current.log_job(config, run_dir, summary)
        return current.run_id
    with group(kind, config, run_dir) as run:
        run.log_job(config, run_dir, summary)
    return run.run_id
