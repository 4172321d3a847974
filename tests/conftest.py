"""Shared fixtures: small real data (scikit-learn digits), a tmp DPSISA_HOME, real Ray with 2 CPUs."""
from __future__ import annotations

import os

import pytest
import torch

from pipeline import config as config_mod

DIGITS = os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "digits.yaml")


# integration modules that start a Ray cluster of their own (shutting the shared one down first)
OWN_CLUSTER = ("test_chaos.py", "test_multinode.py", "test_ray_job_submit.py", "test_storage_outage.py", "test_sweep.py")


def _integration(item) -> bool:
    return "/integration/" in f"/{item.nodeid}"


# integration modules by their time on 2 CPUs, longest first (measured with --durations=0; a stale
# order only costs time): `make test` runs two pytest-xdist workers, and starting the longest
# modules first keeps one worker from idling at the end while the other runs a long one.
LONGEST_FIRST = ("test_pipeline.py", "test_chaos.py", "test_ray_job_submit.py", "test_coordinator.py", "test_audit.py",
                 "test_done_means_gone.py", "test_s3_runs.py", "test_baselines.py", "test_golden.py", "test_sweep.py",
                 "test_storage_outage.py", "test_score_command.py", "test_mlflow_runs.py", "test_transfer_run.py",
                 "test_multinode.py", "test_demo.py")


def _module(item) -> str:
    return item.nodeid.split("::")[0].rsplit("/", 1)[-1]


def _longest_first(item) -> int:
    return LONGEST_FIRST.index(_module(item)) if _module(item) in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(items):
    """Unit tests first (fast feedback, and they never see a Ray cluster an integration module left
    up); then the integration modules on the shared cluster; the modules with a cluster of their own
    last, so the shared one starts once (per worker), not once after each of them; within each
    group, the longest first. `make test` hands whole files to two pytest-xdist workers in this
    order (--dist loadfile --no-loadscope-reorder), so on each worker too no unit test runs after an
    integration module, and the shared cluster starts once."""
    items.sort(key=lambda item: (_integration(item), _module(item) in OWN_CLUSTER, _longest_first(item)))


def pytest_sessionfinish(session, exitstatus):
    session.config._dpsisa_exitstatus = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process with pytest's own exit status once everything is reported. Without
    this, interpreter finalisation runs after the summary, with the native threads that Ray's core
    worker, gRPC and Tune leave in this process; on CI it once ended an all-passed session with
    SIGSEGV (make: exit 2). The verbs' own processes are checked on their own exit codes (ray job
    submit, the sweep command), so this hides nothing they do."""
    status = getattr(config, "_dpsisa_exitstatus", None)
    worker = hasattr(config, "workerinput")  # a pytest-xdist worker: the controller ends the session
    if status is not None and not worker and os.environ.get("DPSISA_TEST_FINALIZE") != "1":  # set it to debug finalisation
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory):
    """An empty MLflow sqlite store with its schema migrated, made once: a test's store starts as a
    copy (making and migrating one costs ~2 s, and most integration tests log to MLflow)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch, request):
    """Every test gets its own DPSISA_HOME and MLflow store (a copy of the empty template, unless
    marked no_mlflow_store); the pretrain and calibration cache is shared per session."""
    import shutil

    monkeypatch.setenv("DPSISA_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DPSISA_CACHE", os.environ.get("DPSISA_TEST_CACHE", "/tmp/dpsisa-test-cache"))
    if _integration(request.node) and request.node.get_closest_marker("no_mlflow_store") is None:
        shutil.copyfile(request.getfixturevalue("_mlflow_template"), tmp_path / "mlflow.db")


@pytest.fixture
def digits_config():
    def make(*overrides: str):
        return config_mod.load(DIGITS, list(overrides))
    return make


RAY_OPTIONS = dict(address="local", num_cpus=2, include_dashboard=False, namespace="dpsisa", configure_logging=False)


def start_ray():
    """The session's shared local Ray cluster (2 CPUs), started if none is up in this process.

    One cluster serves every module that uses `ray_2cpu` (a start costs seconds); a module that
    needs a cluster of its own (multi-node, a proxied store, Tune) shuts this one down first with
    `own_ray_cluster()`, and the next module that needs it starts it again."""
    import ray

    os.environ.setdefault("DPSISA_CACHE", "/tmp/dpsisa-test-cache")
    if not ray.is_initialized():
        ray.init(**RAY_OPTIONS)
    return ray


def own_ray_cluster():
    """Shut the shared cluster down (if up) before a module starts a cluster of its own."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _leave_cluster_clean(ray, timeout_s: float = 20.0) -> None:
    """After a module: kill the named actors it left (kept-alive coordinators, whose shard actors and
    placement groups go with them) and wait for every CPU to be free again; a cluster that does not
    get there is restarted, so no module sees another's leftovers."""
    import time

    for actor in ray.util.list_named_actors(all_namespaces=True):
        try:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
        except ValueError:  # gone meanwhile
            pass
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    for group_id, group in ray.util.placement_group_table().items():  # groups the test process itself owns
        if group["state"] != "REMOVED":
            ray.util.remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(group_id)))
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < ray.cluster_resources().get("CPU", 0.0):
        if time.monotonic() > deadline:
            print(f"\nshared Ray cluster not free after the module ({ray.available_resources()}): restarting it", flush=True)
            ray.shutdown()
            return
        time.sleep(0.2)


@pytest.fixture(scope="module")
def one_multi_process_cluster_at_a_time():
    """Held for a whole module, host-wide (a file lock): the chaos test's multi-node cluster and the
    ray-job test's `ray start --head` never run side by side on two pytest-xdist workers. Run side
    by side on 2 cores, the head's raylet once exited mid-job (its dashboard agent exited with code
    0; the cause was not found), so the second waits for the first."""
    import fcntl
    import tempfile
    from pathlib import Path

    with open(Path(tempfile.gettempdir()) / "dpsisa-tests-own-cluster.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def _shared_ray(s3_store):
    """Session scope; the S3 fixture starts first so that Ray's workers inherit its AWS variables."""
    yield
    own_ray_cluster()


@pytest.fixture(scope="module")
def ray_2cpu(_shared_ray):
    """The shared real local Ray cluster (2 CPUs), left clean for the next module."""
    ray = start_ray()
    yield ray
    if ray.is_initialized():
        _leave_cluster_clean(ray)


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
