"""Operator errors get one line naming the cause and the fix, and the right exit code, before any
cluster or actor starts (issue 17). No Ray here: each is refused first."""
from __future__ import annotations

import socket
import time

import pytest

from pipeline import cli
from pipeline.config import RayConfig
from pipeline.fs import Storage, StorageError, StorageNameError
from pipeline.sisa import cluster


def _unused_port() -> int:
    """A port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_and_stderr(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as caught:
        cli.main(argv)
    return caught.value.code, capsys.readouterr().err.strip()


def test_a_run_dir_naming_no_bucket_is_one_line_exit_3(capsys):
    code, err = _exit_and_stderr(["status", "--run-dir", "s3://"], capsys)
    assert code == 3 and len(err.splitlines()) == 1 and "s3://BUCKET/PREFIX" in err


def test_an_address_with_no_ray_cluster_behind_it_fails_fast_naming_the_fix():
    port = _unused_port()
    started = time.monotonic()
    with pytest.raises(cluster.ClusterError, match=r"no Ray cluster at 127\.0\.0\.1:\d+ .*ray start --head"):
        cluster.connect(RayConfig(address=f"127.0.0.1:{port}"))
    assert time.monotonic() - started < 10


def test_storage_that_cannot_be_written_is_a_failure_not_bad_input(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(StorageError) as caught:
        Storage(blocked / "run").check_writable()  # a folder under a file cannot be created
    assert caught.value.exit_code == 4 and not isinstance(caught.value, StorageNameError)


def test_the_demo_finds_its_default_config_wherever_the_package_lives():
    from pipeline.cli.demo import DEFAULT_CONFIG

    assert DEFAULT_CONFIG.is_file() and DEFAULT_CONFIG.name == "fmnist.yaml"


def test_an_s3_connection_dropped_before_any_response_is_a_storage_error_naming_the_object(tmp_path):
    """botocore's connection errors carry no response: still one StorageError (exit 4), not an AttributeError."""
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError

    from pipeline.fs import Storage, StorageError, _raise_s3

    for exc in (ConnectionClosedError(endpoint_url="http://127.0.0.1:9/b/k"), EndpointConnectionError(endpoint_url="http://127.0.0.1:9")):
        with pytest.raises(StorageError, match="recipes.json"):
            _raise_s3(exc, Storage(tmp_path), "recipes.json")


def test_train_against_a_tracking_server_that_does_not_answer_is_one_line_exit_4_before_any_work(tmp_path, capsys):
    uri = f"http://127.0.0.1:{_unused_port()}"
    started = time.monotonic()
    code, err = _exit_and_stderr(["train", "jobs/configs/digits.yaml", f"tracking.uri={uri}", "--run-dir", str(tmp_path / "run"),
                                  "--quiet"], capsys)
    assert code == 4 and len(err.splitlines()) == 1 and uri in err and "tracking.enabled=false" in err, err
    assert time.monotonic() - started < 30  # not MLflow's minutes of retries
    assert not (tmp_path / "run" / "ledger").exists()


def test_other_verbs_go_on_without_their_mlflow_run_when_the_tracking_server_does_not_answer(tmp_path, capsys):
    from pipeline import config as config_mod
    from pipeline.tracking import mlflow_runs

    config = config_mod.load("jobs/configs/digits.yaml", [f"tracking.uri=http://127.0.0.1:{_unused_port()}"])
    started = time.monotonic()
    with mlflow_runs.verb_run("forget", config, tmp_path, optional=True) as mlrun:
        mlrun.log_summary({"ids": 1})  # a no-op
    assert isinstance(mlrun, mlflow_runs.Untracked) and time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "does not answer" in err and "without its MLflow run" in err
    with pytest.raises(mlflow_runs.TrackingUnavailable):  # the coordinator's release must not go on untracked
        with mlflow_runs.verb_run("forget", config, tmp_path):
            pass
