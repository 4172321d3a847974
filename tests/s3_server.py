"""A real S3-compatible object store for tests: ``moto_server`` (PyPI ``moto[server]``) on 127.0.0.1.

``moto_s3()`` starts the server as a subprocess on a free port, points the standard AWS environment
variables at it *in os.environ* (so subprocesses started later, e.g. Ray workers, inherit them), creates
the bucket ``dpsisa-test`` and yields an ``S3Store`` with ``.endpoint`` and ``.bucket_uri``.

Checked against pyarrow 25 / moto 5.2:

* ``pyarrow.fs.FileSystem.from_uri("s3://bucket/prefix")`` honours ``AWS_ENDPOINT_URL`` (the AWS SDK
  reads it when each ``S3FileSystem`` is constructed, also after S3 was already initialised in the
  process), so code under test needs no endpoint option. ``AWS_ENDPOINT_URL_S3`` would take precedence,
  so it is removed while the store is up (as are ``AWS_PROFILE`` and ``AWS_SESSION_TOKEN``).
* pyarrow refuses ``create_dir("<bucket>")`` unless ``allow_bucket_creation`` is set, hence the
  ``?allow_bucket_creation=true`` URI query below. Bucket names must be valid S3 names (>= 3 chars).
* moto logs every request to stderr; it goes to a temp file, not a pipe, so the server never blocks on
  a full pipe buffer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

BUCKET = "dpsisa-test"
START_TIMEOUT_S = 30.0

_ENV_SET = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
_ENV_UNSET = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN")


@dataclasses.dataclass(frozen=True)
class S3Store:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str = BUCKET

    @property
    def bucket_uri(self) -> str:
        return f"s3://{self.bucket}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_command(port: int) -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    if not os.path.exists(exe):
        exe = shutil.which("moto_server") or ""
    base = [exe] if exe else [sys.executable, "-m", "moto.server"]
    return [*base, "-H", "127.0.0.1", "-p", str(port)]


def _wait_until_up(proc: subprocess.Popen, endpoint: str, log_path: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(endpoint + "/moto-api/", timeout=1):
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.1)
    with open(log_path, errors="replace") as f:
        log = f.read()[-4000:]
    state = f"exited with {proc.returncode}" if proc.poll() is not None else f"not answering after {START_TIMEOUT_S:.0f}s"
    raise RuntimeError(f"moto_server at {endpoint} {state}; stderr/stdout:\n{log}")


@contextlib.contextmanager
def moto_s3() -> Iterator[S3Store]:
    """Start moto_server, export the AWS env vars, create ``dpsisa-test``; undo all of it on exit."""
    import pyarrow.fs as pafs

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="moto_server-", suffix=".log", delete=False)
    proc = subprocess.Popen(_server_command(port), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in (*_ENV_SET, "AWS_ENDPOINT_URL", *_ENV_UNSET)}
    try:
        _wait_until_up(proc, endpoint, log.name)
        os.environ.update(_ENV_SET, AWS_ENDPOINT_URL=endpoint)
        for k in _ENV_UNSET:
            os.environ.pop(k, None)
        store = S3Store(endpoint=endpoint)
        fs, _ = pafs.FileSystem.from_uri(f"{store.bucket_uri}?allow_bucket_creation=true")
        fs.create_dir(store.bucket)
        if fs.get_file_info(store.bucket).type != pafs.FileType.Directory:
            raise RuntimeError(f"bucket {store.bucket} not visible at {endpoint} after creation")
        yield store
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        os.unlink(log.name)
