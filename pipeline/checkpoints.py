"""Atomic checkpoint storage for one shard: stage files plus a manifest that names the live ones.

Commit protocol: write the new stage files under fresh names (temp file, fsync, rename), then
atomically replace `manifest.json`. Readers only follow the manifest, so a crash at any point
leaves either the old or the new version live, never a mix. After a commit, stage files that
saw forgotten samples are deleted: an old checkpoint must not keep a deleted person's data.
"""
from __future__ import annotations

import io
import json
import os
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


def save_torch(path: Path, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def load_torch(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


@dataclass
class Manifest:
    """Live state of a shard: model version, one stage file per slice, ids applied, releases."""

    shard: int
    version: int = 0
    stages: list[dict] = field(default_factory=list)  # {"file", "ids_digest", "samples"} per stage
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
        return load_torch(self.dir / manifest.stages[stage]["file"])

    def write_stage(self, stage: int, version: int, payload: dict) -> dict:
        """Write one stage file (not yet live) and return its manifest entry."""
        path = self.stage_path(stage, version)
        save_torch(path, payload)
        return {"file": path.name, "ids_digest": payload["ids_digest"], "samples": payload["samples"]}

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
