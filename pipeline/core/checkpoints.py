"""Atomic checkpoint storage for one shard: stage files plus a manifest that names the live ones.

The shard folder lives on a local disk or an object store (`storage.Storage`). Commit protocol:
write the new stage files (and the shard's data file less the erased samples) under fresh names,
then replace `manifest.json` in one write (rename locally, one PUT on object stores). Readers only
follow the manifest, so a crash at any point leaves either the old or the new version live, never
a mix. After a commit, stage and data files that saw forgotten samples are deleted: an old
checkpoint or data copy must not keep a deleted person's data.

Integrity (run directories may live in a shared bucket): every `.pt` file is read with
`torch.load(weights_only=True)`, which only rebuilds tensors and plain containers (data files:
`np.load(allow_pickle=False)`), so a tampered file cannot run code on the cluster; payloads
therefore hold tensors, ints, floats, strings, None and dicts/lists/tuples of them, nothing
else. Each stage (and data) file's sha256 is recorded in the manifest entry and checked before
the bytes are deserialised. The hash detects corruption and
edits to a stage file alone; it does NOT stop someone who can also rewrite `manifest.json`
(weights_only loading is what keeps such a file from running code, not the hash). Write access
to the bucket must be limited to the cluster's own identities.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import RecoverableError, UserError
from pipeline.fs import PreconditionFailed, Storage, atomic_write, atomic_write_json  # noqa: F401 - re-exported


class CheckpointIntegrityError(UserError, RuntimeError):
    """A checkpoint differs from its recorded hash, is unreadable, or holds objects that
    weights_only loading refuses: it is not loaded (the user restores or retrains it)."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def torch_bytes(obj: Any) -> bytes:
    import torch  # imported when used: a process that only reads manifests (the coordinator) never loads torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_torch(path: Path, obj: Any) -> str:
    """Write `obj` atomically to a local file; returns the sha256 of the bytes written."""
    data = torch_bytes(obj)
    atomic_write(path, data)
    return sha256_hex(data)


def load_torch(path: Path, sha256: str | None = None, recorded_in: str = "the manifest") -> Any:
    """Tensors and plain metadata from a local `path`, never code (see `load_torch_bytes`)."""
    return load_torch_bytes(Path(path).read_bytes(), path, sha256, recorded_in)


def load_torch_bytes(data: bytes, path: Any, sha256: str | None = None, recorded_in: str = "the manifest") -> Any:
    """Tensors and plain metadata from `data` (read from `path`), never code: weights_only loading,
    on the CPU. With `sha256`, the bytes are hashed and compared before anything is deserialised."""
    if sha256 is not None and sha256_hex(data) != sha256:
        raise CheckpointIntegrityError(
            f"checkpoint {path} failed its integrity check (its sha256 differs from the one in {recorded_in}): "
            "the file was modified or corrupted since it was written; it was not loaded. "
            "Restore it from a backup or retrain the run.")
    import torch

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
    """Live state of a shard: model version, one stage file per slice, ids applied, releases, and
    the shard's own copy of its training data (which drops erased samples in the same commit)."""

    shard: int
    version: int = 0
    stages: list[dict] = field(default_factory=list)  # {"file", "ids_digest", "samples", "sha256", "draw"} per stage
    forgotten: list[int] = field(default_factory=list)  # ids removed from this shard so far
    releases: list[dict] = field(default_factory=list)  # one per version: request, from_stage, ε, seconds, node
    data: dict | None = None  # {"file", "sha256", "samples"}: the shard's training data less `forgotten`

    @property
    def draws(self) -> list[int]:
        """Each live stage's randomness draw (0: the original training's; v: replayed as version v)."""
        return [stage.get("draw", 0) for stage in self.stages]

    def to_dict(self) -> dict:
        return self.__dict__.copy()

    def release_without(self, ids: list[int]) -> dict | None:
        """The release of the first version that excludes every id in `ids` (the one that applied
        the last of them), from the ids each release records; None when a release predates that
        record or some id was never applied."""
        wanted, last = set(int(i) for i in ids), None
        for release in self.releases[1:]:
            if "ids" not in release:
                return None
            if wanted & set(release["ids"]):
                wanted -= set(release["ids"])
                last = release
        return last if not wanted else None


class StaleCommit(RecoverableError, RuntimeError):
    """A replay's commit was fenced off: the manifest changed since the replay started (a second writer)."""


INITIAL_DATA = "data.v0.npz"  # written by `dpsisa train` before the shard's first version exists


class ShardStore:
    """`RUN_DIR/shards/shard_XXX/`: manifest.json, `stage_R.vV.pt` files and `data.vV.npz`."""

    def __init__(self, run_dir: Storage | Path | str, shard: int):
        base = run_dir if isinstance(run_dir, Storage) else Storage(run_dir)
        self.storage = base.sub(f"shards/shard_{shard:03d}")
        self.shard = shard

    @property
    def uri(self) -> str:
        return self.storage.uri

    @property
    def dir(self) -> Path:
        """The local folder (local run directories only)."""
        return self.storage.path

    def _where(self, name: str) -> str:
        return f"{self.storage.uri}/{name}"

    def exists(self) -> bool:
        return self.storage.exists("manifest.json")

    def manifest(self) -> Manifest:
        return self.manifest_tagged()[0]

    def manifest_tagged(self) -> tuple[Manifest, str]:
        """The live manifest and its tag (S3 ETag, else sha256): a replay commits only if the tag
        is unchanged at its end (`commit(..., expected=tag)`)."""
        try:
            data, tag = self.storage.read_tagged("manifest.json")
        except FileNotFoundError:
            raise FileNotFoundError(f"shard {self.shard} has no committed checkpoints in {self.uri}; "
                                    "run `dpsisa train` first.") from None
        return Manifest(**json.loads(data)), tag

    def load_stage(self, manifest: Manifest, stage: int) -> dict:
        """The stage's payload, after checking its bytes against the manifest's sha256.
        Manifests written before hashes were recorded have no "sha256": those files load
        without the check (backwards compatible), still with weights_only loading."""
        entry = manifest.stages[stage]
        try:
            data = self.storage.read_bytes(entry["file"])
        except FileNotFoundError:
            raise CheckpointIntegrityError(f"checkpoint {self._where(entry['file'])} named by the manifest of shard "
                                           f"{self.shard} is missing; restore it from a backup or retrain the run.") from None
        return load_torch_bytes(data, self._where(entry["file"]), entry.get("sha256"), f"manifest.json of shard {self.shard}")

    def damaged(self, manifest: Manifest) -> list[str]:
        """Live stage files that are missing or differ from their recorded sha256 (no deserialising)."""
        bad = []
        for entry in manifest.stages:
            try:
                data = self.storage.read_bytes(entry["file"])
            except FileNotFoundError:
                bad.append(entry["file"])
                continue
            if "sha256" in entry and sha256_hex(data) != entry["sha256"]:
                bad.append(entry["file"])
        return bad

    def write_stage(self, stage: int, version: int, payload: dict, writer: str = "") -> dict:
        """Write one stage file (not yet live) and return its manifest entry, with its sha256.
        `writer` (a replay's own token) makes the name fresh: two writers replaying the same version
        never write the same object, so a stale one cannot touch the files another committed."""
        name = f"stage_{stage}.v{version}{'.' + writer if writer else ''}.pt"
        data = torch_bytes(payload)
        self.storage.write_bytes(name, data)
        return {"file": name, "ids_digest": payload["ids_digest"], "samples": payload["samples"], "sha256": sha256_hex(data)}

    # -- the shard's copy of its training data ----------------------------------------------
    def write_data(self, version: int, ids: np.ndarray, x: np.ndarray, y: np.ndarray, writer: str = "") -> dict:
        """Write the shard's samples (not yet live unless version 0) and return the manifest entry."""
        buffer = io.BytesIO()
        np.savez(buffer, ids=np.asarray(ids, np.int64), x=np.ascontiguousarray(x), y=np.asarray(y))
        name = INITIAL_DATA if version == 0 else f"data.v{version}{'.' + writer if writer else ''}.npz"
        payload = buffer.getvalue()
        self.storage.write_bytes(name, payload)
        return {"file": name, "sha256": sha256_hex(payload), "samples": int(len(ids))}

    def load_data(self, entry: dict | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, x, y) of the shard's data file; `entry` None: the file train wrote (not yet in a manifest).
        Plain arrays only (no pickles), after the sha256 check when the manifest recorded one."""
        name = INITIAL_DATA if entry is None else entry["file"]
        try:
            data = self.storage.read_bytes(name)
        except FileNotFoundError:
            raise CheckpointIntegrityError(f"shard data {self._where(name)} is missing; retrain the run.") from None
        if entry is not None and sha256_hex(data) != entry["sha256"]:
            raise CheckpointIntegrityError(
                f"shard data {self._where(name)} failed its integrity check (its sha256 differs from the one in "
                f"manifest.json of shard {self.shard}); it was not loaded. Restore it from a backup or retrain the run.")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                return arrays["ids"], arrays["x"], arrays["y"]
        except Exception as exc:  # noqa: BLE001 - untrusted bytes
            raise CheckpointIntegrityError(f"shard data {self._where(name)} could not be read ({exc}); retrain the run.") from None

    def commit(self, old: Manifest | None, new: Manifest, expected: str | None = None) -> None:
        """Make `new` live (one write of manifest.json), then delete the stage and data files only
        the old version used: an old checkpoint or data copy must not keep an erased sample.
        With `expected` (the tag `old` was read with), the write is fenced: if another writer
        committed meanwhile, StaleCommit is raised, this writer's new files are removed and
        nothing else changes."""
        body = json.dumps(new.to_dict(), indent=2, sort_keys=True, default=str).encode()
        if expected is None:
            self.storage.write_bytes("manifest.json", body)
        else:
            try:
                self.storage.write_if("manifest.json", body, expected)
            except PreconditionFailed:
                kept = {e["file"] for e in (old.stages if old else [])} | ({old.data["file"]} if old and old.data else set())
                for name in [e["file"] for e in new.stages] + ([new.data["file"]] if new.data else []):
                    if name not in kept:
                        self.storage.delete(name)
                raise StaleCommit(f"shard {self.shard}: another writer committed since this replay read version "
                                  f"{old.version if old else 'none'}; this replay's version {new.version} was discarded") from None
        if old is not None:
            live = {s["file"] for s in new.stages} | ({new.data["file"]} if new.data else set())
            stale = [e["file"] for e in old.stages] + ([old.data["file"]] if old.data else [])
            # ... and whatever a replay that died before its commit left (fresh names nobody will commit)
            stale += [n for n in self.storage.list() if n.startswith(("stage_", "data.v")) and n not in live]
            for name in dict.fromkeys(stale):
                if name not in live:
                    self.storage.delete(name)
        if self.storage.local:
            for stray in Path(self.storage.root).glob(".*.tmp"):
                stray.unlink(missing_ok=True)


def parameter_l2_distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Euclidean distance between two parameter dicts flattened; keys and shapes must match."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        raise ValueError(f"parameter keys differ: only in a: {only_a}, only in b: {only_b}")
    total = 0.0
    for key in sorted(a):
        x = np.asarray(a[key], dtype=np.float64)
        y = np.asarray(b[key], dtype=np.float64)
        if x.shape != y.shape:
            raise ValueError(f"shape mismatch for parameter {key!r}: {x.shape} vs {y.shape}")
        total += float(np.sum((x - y) ** 2))
    return math.sqrt(total)
