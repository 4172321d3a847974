"""A real `ray job submit` round trip: a local Ray head started by the test, train and forget
jobs (digits) submitted through JobSubmissionClient, concurrent forget jobs on one run, MLflow as
a tracking server the jobs share (the cluster setup), then the ledger checked."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import own_ray_cluster

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_multi_process_cluster_at_a_time")]
ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


def stop_session(session: int, grace_s: float = 3.0) -> None:
    """Stop every process of one session (the Ray head this module started: `ray start` ran in a new
    session, and its services and workers inherit it), never another Ray cluster on the host."""
    import signal

    def members() -> list[int]:
        return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and int(p.name) != os.getpid()
                and _session_of(int(p.name)) == session]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in members():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while members() and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head` in a subprocess of its own session (token auth stays on); after the module,
    that session's processes are stopped (`ray stop` would stop every Ray cluster on the host)."""
    own_ray_cluster()  # the session's shared in-process cluster goes first
    port, dashboard, agent, agent_grpc = _free_port(), _free_port(), _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    # free ports for the dashboard agent too: another cluster on the host (a second test worker's)
    # may hold the default one, and the job API needs this head's agent
    head = subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
                             f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
                             f"--dashboard-agent-grpc-port={agent_grpc}", "--disable-usage-stats"], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = head.communicate(timeout=180)
        assert head.returncode == 0, output
        token = subprocess.run([RAY, "get-auth-token"], check=True, env=env, capture_output=True, text=True).stdout.strip()
        yield f"http://127.0.0.1:{dashboard}", {"Authorization": f"Bearer {token}"}, port
    finally:
        stop_session(head.pid)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1, as the README's cluster setup runs it on the head."""
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "wb"))
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if server.poll() is not None:
                raise AssertionError((root / "server.log").read_text()[-2000:]) from None
            time.sleep(0.5)
    try:
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait(client, job_id: str, timeout: float = 400) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            return status
        time.sleep(0.5)
    client.stop_job(job_id)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s:\n{client.get_job_logs(job_id)[-3000:]}")


def _submit_when_the_agent_is_up(client, timeout_s: float = 120, **job) -> str:
    """The first submission: a head just started answers 500 "No available agent" until its
    dashboard agent has registered (seconds; longer on a loaded machine), and says to try again."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)


ENV_PACKAGE_LOST = "Failed to download runtime_env file package"


def _finished(client, job_id: str, **job) -> tuple[str, str]:
    """(status, job id) once the job ends. A job whose working_dir package Ray's GCS dropped before the
    job could start (Ray's own race: ray-project/ray#36703, #47471; seen once in ~3 suite runs) never
    ran its entrypoint, so it is submitted once more; any other failure is returned as it is."""
    status = _wait(client, job_id)
    if status != "SUCCEEDED" and ENV_PACKAGE_LOST in client.get_job_logs(job_id):
        print(f"\njob {job_id}: Ray lost its working_dir package before it started; submitting it again", flush=True)
        job_id = client.submit_job(**job)
        status = _wait(client, job_id)
    return status, job_id


def test_concurrent_forget_jobs_on_one_run_each_apply_once_and_log_to_the_mlflow_server(ray_head, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, auth_headers, _ = ray_head
    client = JobSubmissionClient(address, headers=auth_headers)  # token auth stays on
    run_dir = tmp_path / "job-run"
    runtime_env = {"working_dir": str(ROOT), "env_vars": {
        "DPSISA_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": mlflow_server,
        "DPSISA_CACHE": os.environ.get("DPSISA_CACHE", str(tmp_path / "cache"))}}
    train_job = dict(entrypoint=f"{sys.executable} jobs/train.py jobs/configs/digits.yaml train.epochs=1 --run-dir {run_dir}",
                     runtime_env=runtime_env)
    status, train = _finished(client, _submit_when_the_agent_is_up(client, **train_job), **train_job)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(train)[-3000:]
    assignments = pq.read_table(run_dir / "ledger" / "assignments.parquet")
    targets = [int(assignments["sample_id"][k].as_py()) for k in (10, 20)]
    forget_jobs = [dict(entrypoint=f"{sys.executable} jobs/forget.py --run-dir {run_dir} --ids {t} --json",
                        runtime_env=runtime_env) for t in targets]
    forgets = [client.submit_job(**job) for job in forget_jobs]  # two drivers at once, one coordinator
    for i, job in enumerate(forgets):
        status, forgets[i] = _finished(client, job, **forget_jobs[i])
        job = forgets[i]
        assert status == JobStatus.SUCCEEDED, client.get_job_logs(job)[-3000:]
        logs = client.get_job_logs(job)
        assert '"shards_retrained"' in logs and "View run" not in logs  # stdout holds the JSON, not MLflow's links
    requests = pq.read_table(run_dir / "ledger" / "requests.parquet").to_pylist()
    assert sorted((r["sample_id"], r["status"]) for r in requests) == sorted((t, "done") for t in targets)
    assert len({r["request_id"] for r in requests}) == 2
    bad = client.submit_job(entrypoint=f"{sys.executable} jobs/forget.py --run-dir {run_dir} --ids {targets[0]}",
                            runtime_env=runtime_env)
    assert _wait(client, bad) == JobStatus.FAILED  # already forgotten: a clear error, non-zero exit
    assert "already forgotten" in client.get_job_logs(bad)

    tracking = MlflowClient(mlflow_server)  # every job's driver logged to the one server
    found = tracking.search_runs([tracking.get_experiment_by_name("dpsisa").experiment_id])
    verbs = sorted(r.data.tags["dpsisa.kind"] for r in found if "dpsisa.writer" not in r.data.tags)
    assert verbs.count("train") == 1 and verbs.count("forget") == 2 and verbs.count("run") == 1
    released = [r for r in found if r.data.tags.get("dpsisa.writer") == "coordinator"]  # the coordinator's registrations
    logged = {a.path for r in released for a in tracking.list_artifacts(r.info.run_id, "receipts")}
    assert 1 <= len(released) <= 2 and logged == {f"receipts/{r['request_id']}.json" for r in requests}
    parent = next(r for r in found if r.data.tags["dpsisa.kind"] == "run").info.run_id
    assert all(r.data.tags.get("mlflow.parentRunId") == parent for r in found if r.data.tags["dpsisa.kind"] != "run")


def test_a_command_without_an_address_starts_its_own_cluster_and_never_joins_the_hosts_running_one(ray_head):
    """`ray start --head` recorded its cluster as the host's current one; a command given no address
    (no ray.address, no RAY_ADDRESS) still starts a cluster of its own, as it says it does."""
    _, _, head_port = ray_head
    probe = ("import ray; from pipeline.config import RayConfig; from pipeline.sisa import cluster; "
             "started = cluster.connect(RayConfig(num_cpus=1)); "
             "print(started, ray.get_runtime_context().gcs_address.rsplit(':', 1)[1], ray.cluster_resources()['CPU'])")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", probe], env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    started, port, cpus = done.stdout.split()[-3:]
    assert started == "True" and int(port) != head_port and float(cpus) == 1.0
