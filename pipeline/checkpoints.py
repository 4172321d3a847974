"""Atomic checkpoint storage for one shard: stage files plus a manifest that names the live ones.

Commit protocol: write the new stage files under fresh names (temp file, fsync, rename), then
atomically replace `manifest.json`. Readers only follow the manifest, so a crash at any point
leaves either the old or the new version live, never a mix. After a commit, stage files that
saw forgotten samples are deleted: an old checkpoint must not keep a deleted person's data.

Integrity (run directories may live in a shared bucket): every `.pt` file is read with
`torch.load(weights_only=True)`, which only rebuilds tensors and plain containers, so a tampered
file cannot run code on the cluster; payloads therefore hold tensors, ints, floats, strings,
None and dicts/lists/tuples of them, nothing else. Each stage file's sha256 is recorded in the
manifest entry and checked before the bytes are deserialised. The hash detects corruption and
edits to a stage file alone; it does NOT stop someone who can also rewrite `manifest.json`
(weights_only loading is what keeps such a file from running code, not the hash). Write access
to the bucket must be limited to the cluster's own identities.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old or the new file, never a torn one."""
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


class CheckpointIntegrityError(RuntimeError):
    """A checkpoint differs from its recorded hash, is unreadable, or holds objects that
    weights_only loading refuses: it is not loaded (the user restores or retrains it)."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_torch(path: Path, obj: Any) -> str:
    """Write `obj` atomically; returns the sha256 of the bytes written (for the manifest)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    atomic_write(path, data)
    return sha256_hex(data)


def load_torch(path: Path, sha256: str | None = None, recorded_in: str = "the manifest") -> Any:
    """Tensors and plain metadata from `path`, never code: weights_only loading, on the CPU.

    With `sha256`, the bytes are hashed and compared before anything is deserialised."""
    data = Path(path).read_bytes()
    if sha256 is not None and sha256_hex(data) != sha256:
        raise CheckpointIntegrityError(
            f"checkpoint {path} failed its integrity check (its sha256 differs from the one in {recorded_in}): "
            "the file was modified or corrupted since it was written; it was not loaded. "
            "Restore it from a backup or retrain the run.")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # outside the weights_only allowlist: possibly code
        found = re.search(r"GLOBAL (\S+)", str(exc))  # torch's own text suggests weights_only=False: not shown
        what = f"refused global {found.group(1)}" if found else "unsupported pickle contents"
        raise CheckpointIntegrityError(
            f"checkpoint {path} holds non-tensor objects that weights_only loading refuses ({what}; possible "
            "tampering); refusing to load it. Restore it from a backup or retrain the run.") from None
    except Exception as exc:  # untrusted bytes: the parsers raise anything (RuntimeError, EOFError, struct.error ...)
        reason = str(exc).split(". ")[0] or exc.__class__.__name__
        raise CheckpointIntegrityError(
            f"checkpoint {path} could not be read ({reason}): the file is corrupted or truncated; "
            "restore it from a backup or retrain the run.") from exc


@dataclass
class Manifest:
    """Live state of a shard: model version, one stage file per slice, ids applied, releases."""

    shard: int
    version: int = 0
    stages: list[dict] = field(default_factory=list)  # {"file", "ids_digest", "samples", "sha256"} per stage
    forgotten: list[int] = field(default_factory=list)  # ids removed from this shard so far
    releases: list[dict] = field(default_factory=list)  # one per version: request, from_stage, ε, seconds

    def to_dict(self) -> dict:
        return self.__dict__.copy()


class ShardStore:
    """`RUN_DIR/shards/shard_XXX/`: manifest.json plus `stage_R.vV.pt` files."""

    def __init__(self, run_dir: Path | str, shard: int):
        self.dir = Path(run_dir) / "shards" / f"shard_{shard:03d}"
        self.shard = shard

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> Manifest:
        if not self.exists():
            raise FileNotFoundError(f"shard {self.shard} has no committed checkpoints in {self.dir}; run `dpsisa train` first.")
        return Manifest(**json.loads(self.manifest_path.read_text()))

    def stage_path(self, stage: int, version: int) -> Path:
        return self.dir / f"stage_{stage}.v{version}.pt"

    def load_stage(self, manifest: Manifest, stage: int) -> dict:
        """The stage's payload, after checking its bytes against the manifest's sha256.
        Manifests written before hashes were recorded have no "sha256": those files load
        without the check (backwards compatible), still with weights_only loading."""
        entry = manifest.stages[stage]
        return load_torch(self.dir / entry["file"], entry.get("sha256"), f"{self.manifest_path.name} of shard {self.shard}")

    def damaged(self, manifest: Manifest) -> list[str]:
        """Live stage files that are missing or differ from their recorded sha256 (no deserialising)."""
        bad = []
        for entry in manifest.stages:
            path = self.dir / entry["file"]
            if not path.is_file() or ("sha256" in entry and sha256_hex(path.read_bytes()) != entry["sha256"]):
                bad.append(entry["file"])
        return bad

    def write_stage(self, stage: int, version: int, payload: dict) -> dict:
        """Write one stage file (not yet live) and return its manifest entry, with its sha256."""
        path = self.stage_path(stage, version)
        digest = save_torch(path, payload)
        return {"file": path.name, "ids_digest": payload["ids_digest"], "samples": payload["samples"], "sha256": digest}

    def commit(self, old: Manifest | None, new: Manifest) -> None:
        """Make `new` live atomically, then delete stage files only the old version used."""
        atomic_write_json(self.manifest_path, new.to_dict())
        if old is not None:
            live = {s["file"] for s in new.stages}
            for entry in old.stages:
                if entry["file"] not in live:
                    (self.dir / entry["file"]).unlink(missing_ok=True)
        for stray in self.dir.glob(".*.tmp"):
            stray.unlink(missing_ok=True)
