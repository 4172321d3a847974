"""Shared fixtures: small real data (scikit-learn digits), a tmp DPSISA_HOME, real Ray with 2 CPUs."""
from __future__ import annotations

import os

import pytest
import torch

from pipeline import config as config_mod

DIGITS = os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "digits.yaml")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test gets its own DPSISA_HOME and MLflow store; the pretrain cache is shared per session."""
    monkeypatch.setenv("DPSISA_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DPSISA_CACHE", os.environ.get("DPSISA_TEST_CACHE", "/tmp/dpsisa-test-cache"))


@pytest.fixture
def digits_config():
    def make(*overrides: str):
        return config_mod.load(DIGITS, list(overrides))
    return make


@pytest.fixture(scope="module")
def ray_2cpu():
    """A real local Ray cluster with 2 CPUs for one test module."""
    import ray

    os.environ.setdefault("DPSISA_CACHE", "/tmp/dpsisa-test-cache")
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="dpsisa", configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def s3_store():
    """A real S3-compatible store (moto_server on 127.0.0.1) with bucket ``dpsisa-test``, for the whole session.

    The AWS variables (AWS_ENDPOINT_URL etc.) are set in os.environ directly, not via monkeypatch, so Ray
    workers started later inherit them; pyarrow's FileSystem.from_uri("s3://...") picks up AWS_ENDPOINT_URL.
    """
    from s3_server import moto_s3

    with moto_s3() as store:
        yield store
