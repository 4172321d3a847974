"""Where run directories and local outputs live: the path policy every command shares.

Relative locations resolve under $DPSISA_HOME, else ~/dpsisa inside a `ray job submit` entrypoint
(its cwd is a temporary copy), else the cwd; URIs (`s3://...`) are taken as given.
"""
from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from pipeline.config import Config
from pipeline.fs import is_uri
from pipeline.storage.rundir import RunDir, RunError


def in_ray_job() -> bool:
    """True inside an entrypoint started by `ray job submit`."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def home() -> Path:
    """Where relative run dirs and the default MLflow store live: $DPSISA_HOME, else ~/dpsisa
    inside a `ray job submit` entrypoint (its cwd is a temporary copy), else the cwd."""
    if os.environ.get("DPSISA_HOME"):
        return Path(os.environ["DPSISA_HOME"]).expanduser()
    return Path.home() / "dpsisa" if in_ray_job() else Path.cwd()


def resolve_local_dir(location: str | Path | None, config: Config | None = None) -> Path:
    """A local output folder (relative: under $DPSISA_HOME or the cwd); None: a fresh name."""
    if location is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        location = Path("runs") / f"{stamp}-{config.data.name}-S{config.shards.count}R{config.shards.slices}"
    if is_uri(location) and not str(location).startswith("file://"):
        raise RunError(f"{location}: this command writes local folders only; pass a local path.")
    path = Path(str(location).removeprefix("file://")).expanduser()
    return (path if path.is_absolute() else home() / path).resolve()


def resolve_run_dir(location: str | Path | RunDir | None, config: Config | None = None) -> RunDir:
    """A run directory: a URI as given, a local path (relative: under $DPSISA_HOME or the cwd)."""
    if isinstance(location, RunDir):
        return location
    if location is not None and is_uri(location):
        return RunDir(str(location))
    return RunDir(resolve_local_dir(location, config))
