"""A run directory, typed: every read and write of run files goes through `RunDir`.

Layout (a local folder or an object-store prefix, see `storage.py`):
  config.yaml          the resolved config
  recipes.json         per-shard DP recipe
  model.json           what the model is built from besides the config (input shape, classes)
  pretrained.pt        the public model's weights (tensors only, sha256 in model.json)
  train_summary.json   what `dpsisa train` measured
  mlflow.json          the run's MLflow parent run
  ledger/              assignments.parquet, requests.parquet
  shards/shard_XXX/    manifest.json, stage_R.vV.pt, data.vV.npz
  coordinator.lease    which Ray cluster currently writes the run (see `coordinator.py`)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from pipeline import config as config_mod
from pipeline.config import Config
from pipeline.core.checkpoints import CheckpointIntegrityError, ShardStore, load_torch_bytes, sha256_hex, torch_bytes
from pipeline.core.privacy import Recipe, person_privacy
from pipeline.errors import UserError
from pipeline.fs import Storage
from pipeline.storage.ledger import Ledger

if TYPE_CHECKING:  # torch is loaded only where a model is built (not by the coordinator)
    from pipeline.core.models import Classifier

CONFIG, RECIPES, MODEL, PRETRAINED, SUMMARY = "config.yaml", "recipes.json", "model.json", "pretrained.pt", "train_summary.json"


class RunError(UserError, RuntimeError):
    """The run directory is missing, incomplete or already used."""


class RunDir(Storage):
    """One run's files, wherever they live."""

    def __init__(self, location: str | os.PathLike | Storage):
        super().__init__(location.uri if isinstance(location, Storage) else location)

    def is_run(self) -> bool:
        return self.exists(CONFIG)

    # -- config and recipes -----------------------------------------------------------------
    def config(self) -> Config:
        try:
            text = self.read_bytes(CONFIG).decode()
        except FileNotFoundError:
            raise RunError(f"{self.uri} is not a dpsisa run directory (no {CONFIG}); "
                           "pass the --run-dir printed by `dpsisa train`.") from None
        return config_mod.from_dict(yaml.safe_load(text) or {})

    def write_config(self, config: Config) -> None:
        self.write_bytes(CONFIG, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())

    def recipes(self) -> list[Recipe]:
        return [Recipe.from_dict(r) for r in self.read_json(RECIPES)]

    def write_recipes(self, recipes: list[Recipe]) -> None:
        self.write_json(RECIPES, [r.to_dict() for r in recipes])

    def person_privacy(self, epsilon: float | None, largest_subject: int | None = None) -> dict:
        """What a release history of `epsilon` per privacy unit means for a person (status, receipts,
        registry tags): `privacy_unit`, `epsilon_per_person`, `delta_per_person` and, with unit
        "sample", the group bound for `largest_subject` samples (default: the run's largest subject)."""
        recipe = self.recipes()[0]
        if largest_subject is None and recipe.unit == "sample" and epsilon is not None:
            largest_subject = self.ledger().largest_subject()
        return person_privacy(recipe.unit, epsilon, recipe.delta, largest_subject)

    # -- summary ----------------------------------------------------------------------------
    def summary(self) -> dict:
        try:
            return self.read_json(SUMMARY)
        except FileNotFoundError:
            raise RunError(f"{self.uri} has no {SUMMARY}: its training did not finish; train a new run.") from None

    def write_summary(self, summary: dict) -> None:
        self.write_json(SUMMARY, summary)

    # -- the public (pretrained) model ------------------------------------------------------
    def write_pretrained(self, model: Classifier, input_shape: tuple[int, ...], num_classes: int) -> None:
        data = torch_bytes(model.state_dict())
        self.write_bytes(PRETRAINED, data)
        self.write_json(MODEL, {"input_shape": list(input_shape), "num_classes": int(num_classes), "sha256": sha256_hex(data)})

    def model_info(self) -> dict:
        return self.read_json(MODEL)

    def pretrained_model(self, config: Config) -> Classifier:
        """The public model every shard starts from, rebuilt from the run's files (weights_only, hash-checked)."""
        from pipeline.core import models

        info = self.model_info()
        model = models.build(config.model.name, tuple(info["input_shape"]), info["num_classes"], config.model.width, config.seed)
        try:
            data = self.read_bytes(PRETRAINED)
        except FileNotFoundError:
            raise CheckpointIntegrityError(f"{self.uri}/{PRETRAINED} is missing; retrain the run.") from None
        model.load_state_dict(load_torch_bytes(data, f"{self.uri}/{PRETRAINED}", info.get("sha256"), MODEL))
        return model.eval()

    # -- parts ------------------------------------------------------------------------------
    def ledger(self, keep_requests: bool = False) -> Ledger:
        return Ledger(self, keep_requests)

    def shard(self, shard: int) -> ShardStore:
        return ShardStore(self, shard)

    def local_dir(self, what: str) -> Path:
        """The local folder, for verbs that only work on local disks (named in the error)."""
        if not self.local:
            raise RunError(f"{what} needs a local directory; {self.uri} is on object storage.")
        return Path(self.root)


def open_run(location: str | os.PathLike | Storage) -> RunDir:
    return location if isinstance(location, RunDir) else RunDir(location)


def trained_ids(run_dir) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) the live model version trained on: the ledger's assignments less done forgets."""
    ledger = open_run(run_dir).ledger()
    table = ledger.assignments()
    ids, labels = table["sample_id"].to_numpy(), table["label"].to_numpy()
    keep = ~np.isin(ids, np.fromiter(ledger.forgotten_ids(), np.int64))
    return ids[keep], labels[keep]
