"""Where a run directory lives: a local folder or an object-store prefix, through `pyarrow.fs`.

A run directory is named by a local path or a URI (`s3://bucket/prefix`, `gs://bucket/prefix`,
`file:///abs/path`), resolved with `pyarrow.fs.FileSystem.from_uri` — the way Ray Train's
`storage_path` works. S3 endpoint and credentials come from the standard AWS environment
variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`),
so an S3-compatible store works unchanged; nothing about credentials is stored with the run.

Objects are read and written whole. A write is atomic for readers: on a local disk through a
temporary file, fsync and rename; on an object store a PUT (or a completed multipart upload)
replaces the object in one step. The commit protocols above this module (checkpoints, ledger)
only rely on that: new objects under fresh names, then one small object (a manifest) naming them.

`Storage` pickles as its URI (credentials are never pickled): Ray actors rebuild the filesystem
from the environment of the node they run on.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipeline.errors import RecoverableError, UserError

URI_SCHEMES = ("s3://", "gs://", "gcs://", "file://", "hdfs://", "abfs://", "abfss://")


class StorageError(RecoverableError, RuntimeError):
    """The run directory's storage cannot be reached (exit 4: nothing recorded is lost; rerun later)."""

    hint = ("Nothing recorded is lost; rerun the command once the storage answers (`dpsisa status --run-dir DIR` "
            "shows where requests stand).")


class StorageNameError(StorageError, UserError):
    """The run directory's location cannot be used as given (exit 3); the message says what to fix."""

    exit_code = 3


class PreconditionFailed(RecoverableError, RuntimeError):
    """A conditional write found the object changed since it was read (another writer was first)."""


def is_uri(location: str | os.PathLike) -> bool:
    return str(location).startswith(URI_SCHEMES)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a local `path` so that readers see the old or the new file, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


class Storage:
    """A folder: a local directory or an object-store prefix. Keys are '/'-separated and relative."""

    def __init__(self, location: str | os.PathLike):
        text = str(location)
        if is_uri(text):
            try:
                self.fs, root = pafs.FileSystem.from_uri(text)
            except (OSError, ValueError) as exc:
                raise StorageNameError(f"cannot open run storage {text}: {exc}".split("\n")[0]) from None
            self.local = isinstance(self.fs, pafs.LocalFileSystem)
            self.root = root.rstrip("/")
            if not self.root:
                scheme = text.split("://", 1)[0]
                raise StorageNameError(f"{text} names no bucket or folder: pass {scheme}://BUCKET/PREFIX (e.g. "
                                       f"{scheme}://my-bucket/runs/run-1).")
            self.uri = str(Path(self.root)) if self.local else text.rstrip("/")
        else:
            self.fs, self.local = pafs.LocalFileSystem(), True
            self.root = str(Path(text).expanduser().resolve())
            self.uri = self.root

    def __reduce__(self):
        return (self.__class__, (self.uri,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Storage) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.uri!r})"

    @property
    def name(self) -> str:
        return self.root.rstrip("/").rsplit("/", 1)[-1]

    @property
    def path(self) -> Path:
        """The local folder (only for local storage: object stores have no path)."""
        if not self.local:
            raise StorageError(f"{self.uri} is on object storage; this operation needs a local directory.")
        return Path(self.root)

    def key(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def sub(self, rel: str) -> Storage:
        """A folder inside this one (same filesystem)."""
        child = object.__new__(self.__class__ if self.__class__ is Storage else Storage)
        child.fs, child.local, child.root = self.fs, self.local, self.key(rel)
        child.uri = child.root if self.local else f"{self.uri}/{rel}"
        return child

    # -- whole objects ----------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.key(rel)).type == pafs.FileType.File

    def read_bytes(self, rel: str) -> bytes:
        """The whole object as one version. On S3 one GET (pyarrow's input stream sizes the object
        with a HEAD, then reads ranges: an object replaced in between came back torn)."""
        if self._s3_location() is not None:
            return self.read_tagged(rel)[0]
        try:
            with self.fs.open_input_stream(self.key(rel)) as stream:
                return stream.read()
        except FileNotFoundError:
            raise
        except OSError as exc:
            if "not exist" in str(exc) or "NoSuchKey" in str(exc) or "Path does not exist" in str(exc):
                raise FileNotFoundError(self.key(rel)) from None
            raise StorageError(f"cannot read {self.uri}/{rel}: {str(exc).splitlines()[0]}") from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Replace `rel` atomically for readers (temp file + rename locally, one PUT on object stores)."""
        if self.local:
            try:
                atomic_write(Path(self.key(rel)), data)
            except OSError as exc:  # a read-only folder, a full disk: the write did not happen
                raise StorageError(f"cannot write {self.uri}/{rel}: {exc.strerror or exc} (this write changed "
                                   "nothing; make the folder writable and rerun)") from None
            return
        try:
            with self.fs.open_output_stream(self.key(rel)) as stream:
                stream.write(data)
        except OSError as exc:
            raise StorageError(f"cannot write {self.uri}/{rel}: {str(exc).splitlines()[0]}") from None

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    # -- conditional writes (fencing) -------------------------------------------------------
    def read_tagged(self, rel: str) -> tuple[bytes, str]:
        """The object and a tag that changes whenever it is replaced: its ETag on S3, else its sha256."""
        if self._s3_location() is not None:
            bucket, key = self._s3_location(rel)
            try:
                answer = _s3_client().get_object(Bucket=bucket, Key=key)
            except Exception as exc:  # noqa: BLE001 - botocore's errors, mapped below
                _raise_s3(exc, self, rel)
            return answer["Body"].read(), answer["ETag"]
        data = self.read_bytes(rel)
        return data, hashlib.sha256(data).hexdigest()

    def write_if(self, rel: str, data: bytes, tag: str | None) -> None:
        """Replace `rel` only if it still carries `tag` (None: only if it does not exist yet), else
        raise PreconditionFailed and change nothing. S3: a conditional PUT (If-Match / If-None-Match)
        through boto3. Local disks: compare and write under an exclusive lock. Other stores: compare,
        then write (not atomic; their writers are fenced by the lease's time limit instead)."""
        location = self._s3_location(rel)
        if location is not None:
            condition = {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}
            try:
                _s3_client().put_object(Bucket=location[0], Key=location[1], Body=data, **condition)
            except Exception as exc:  # noqa: BLE001 - botocore's errors, mapped below
                _raise_s3(exc, self, rel)
            return
        with self.file_lock(f".{rel.replace('/', '_')}.lock"):
            try:
                current = hashlib.sha256(self.read_bytes(rel)).hexdigest()
            except FileNotFoundError:
                current = None
            if current != tag:
                raise PreconditionFailed(f"{self.uri}/{rel} changed since it was read; not replaced")
            self.write_bytes(rel, data)

    def _s3_location(self, rel: str = "") -> tuple[str, str] | None:
        """(bucket, key) when this folder is on S3, else None."""
        if self.local or not self.uri.startswith("s3://"):
            return None
        bucket, _, key = self.key(rel).partition("/")
        return bucket, key

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def delete(self, rel: str) -> None:
        """Remove one object; absent is fine."""
        try:
            self.fs.delete_file(self.key(rel))
        except FileNotFoundError:
            pass
        except OSError as exc:
            if "not exist" not in str(exc) and "NoSuchKey" not in str(exc):
                raise

    def list(self, rel: str = "") -> list[str]:
        """Names of the objects directly inside folder `rel` (empty when it does not exist)."""
        selector = pafs.FileSelector(self.key(rel), allow_not_found=True, recursive=False)
        return sorted(info.base_name for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File)

    def check_writable(self) -> None:
        """Write and remove a small object: StorageError (naming the location) if this folder cannot be written."""
        probe = ".dpsisa-write-check"
        try:
            self.write_bytes(probe, b"ok")
            self.delete(probe)
        except StorageError:
            raise
        except OSError as exc:
            raise StorageError(f"cannot write to {self.uri}: {exc.__class__.__name__}: {exc}") from None

    def ensure(self) -> None:
        """Create the folder (a no-op on object stores, where folders are key prefixes)."""
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    @contextmanager
    def file_lock(self, rel: str) -> Iterator[None]:
        """An exclusive cross-process lock on a local folder; on object storage a no-op (single
        writers there are the run's coordinator and its lease, see `coordinator.py`)."""
        if not self.local:
            with nullcontext():
                yield
            return
        path = Path(self.key(rel))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise StorageError(f"cannot lock {self.uri}/{rel}: {exc.strerror or exc} (nothing was changed; make the "
                               "folder writable and rerun)") from None
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _s3_client():
    """boto3's S3 client, configured like pyarrow's (AWS_ENDPOINT_URL and the AWS_* variables)."""
    return _s3_client_for(os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ACCESS_KEY_ID"))


_CLIENT_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4)
def _s3_client_for(endpoint: str | None, key_id: str | None):
    import boto3

    with _CLIENT_LOCK:  # boto3's default session is not safe to build clients from in several threads at once
        return boto3.client("s3", endpoint_url=endpoint)


def _raise_s3(exc: Exception, storage: Storage, rel: str) -> None:
    response = getattr(exc, "response", None) or {}  # botocore's connection errors carry none
    code = response.get("Error", {}).get("Code", "")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
        raise PreconditionFailed(f"{storage.uri}/{rel} changed since it was read; not replaced") from None
    if code in ("NoSuchKey", "404") or status == 404:
        raise FileNotFoundError(storage.key(rel)) from None
    raise StorageError(f"cannot reach {storage.uri}/{rel}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None
