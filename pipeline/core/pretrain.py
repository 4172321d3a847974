"""Pretrain the public model once (no DP: public data) and cache it by a hash of what defines it."""
from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import Config, cache_root, digest
from pipeline.core import models
from pipeline.core.augment import augment
from pipeline.core.checkpoints import load_torch, save_torch
from pipeline.data.datasets import Data
from pipeline.errors import UserError

logger = logging.getLogger(__name__)


class PretrainError(UserError, ValueError):
    """The source task cannot be built from the public data (e.g. a class it does not hold)."""


def cache_dir(config: Config) -> Path:
    return cache_root(config) / "pretrained"


def seed(config: Config) -> int:
    """The pretraining seed: `pretrain.seed`, or the run's seed when unset."""
    return config.seed if config.pretrain.seed is None else config.pretrain.seed


def source_classes(config: Config, data: Data) -> list[int]:
    """The source task's class labels, in head order: `pretrain.classes`, or every label of the public data."""
    if config.pretrain.classes is None:
        return list(range(int(data.public.y.max() + 1)))
    return list(config.pretrain.classes)


def cache_key(config: Config, data: Data, model: torch.nn.Module) -> str:
    """Everything that changes the pretrained weights, and nothing else (not ε, shards, ...);
    the architecture enters as its parameter names and shapes, so a code change never loads stale weights.
    The source task (`pretrain.classes`) enters when set (unset: the key of every run before it existed)."""
    d, m, p = config.data, config.model, config.pretrain
    architecture = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    parts = ["v2", architecture, d.name, d.public, d.public_size if d.public == "heldout" else None, m.name, m.width,
             p.epochs, p.lr, p.batch_size, p.augment, seed(config), data.input_shape, len(source_classes(config, data))]
    if p.classes is not None:
        parts.append(["classes", list(p.classes)])
    return digest(*parts)


def _fit(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, config: Config) -> None:
    p = config.pretrain
    gen = torch.Generator().manual_seed(seed(config))
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=0.9, weight_decay=5e-4)
    steps = p.epochs * math.ceil(len(xs) / p.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=p.lr, total_steps=max(1, steps))
    model.train()
    for epoch in range(p.epochs):
        order, total, start = torch.randperm(len(xs), generator=gen), 0.0, time.perf_counter()
        for i in range(0, len(xs), p.batch_size):
            idx = order[i: i + p.batch_size]
            batch = augment(xs[idx], gen) if p.augment else xs[idx]
            loss = F.cross_entropy(model(batch), ys[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        logger.info(f"  pretrain epoch {epoch + 1}/{p.epochs}: loss {total / len(xs):.4f} ({time.perf_counter() - start:.1f}s)")


def source_task(config: Config, data: Data) -> tuple[np.ndarray, np.ndarray]:
    """The public samples of the source classes, labelled by their head index (class `classes[k]` → k)."""
    classes = source_classes(config, data)
    present = set(np.unique(data.public.y).tolist())
    missing = [c for c in classes if c not in present]
    if missing:
        raise PretrainError(f"pretrain.classes {missing} have no public samples ({config.data.public} public data has "
                            f"labels {sorted(present)}); choose labels the public data holds.")
    head_index = np.full(int(data.public.y.max()) + 1, -1, np.int64)
    head_index[classes] = np.arange(len(classes))
    keep = head_index[data.public.y] >= 0
    return data.public.x[keep], head_index[data.public.y[keep]]


def public_model(config: Config, data: Data) -> tuple[models.Classifier, dict]:
    """The public model with its own source head (one output per source class, in `source_classes`
    order): loaded from cache, or pretrained (no DP: public data) on the source task and cached."""
    classes = source_classes(config, data)
    model = models.build(config.model.name, data.input_shape, len(classes), config.model.width, seed(config))
    key = cache_key(config, data, model)
    path = cache_dir(config) / f"{config.model.name}-{key}.pt"
    info = {"cache_key": key, "path": str(path), "cached": path.is_file(), "source_classes": classes}
    if path.is_file():
        model.load_state_dict(load_torch(path))
        logger.info(f"pretrained model: cache hit {path}")
    else:
        x, y = source_task(config, data)
        logger.info(f"pretraining {config.model.name} on {len(y)} public samples of {len(classes)} classes "
            f"({config.pretrain.epochs} epochs, cached at {path}) ...")
        start = time.perf_counter()
        _fit(model, x, y, config)
        info["seconds"] = time.perf_counter() - start
        save_torch(path, model.state_dict())
    return model.eval(), info


def for_target(source: models.Classifier, config: Config, data: Data) -> models.Classifier:
    """The model every shard starts from. When the source task's labels are not the target's
    (a class subset, another order, or another data set such as CIFAR-100 for CIFAR-10) the head is
    re-initialised for all target classes, seeded by the public seed alone: the same head for every
    shard, replay, verify and LiRA reference (which share the pretraining seed)."""
    if config.data.public == "heldout" and source_classes(config, data) == list(range(data.num_classes)):
        return source
    model = copy.deepcopy(source)
    torch.manual_seed(seed(config) + 1)
    model.fc = torch.nn.Linear(model.fc.in_features, data.num_classes)
    return model.eval()


def pretrained_model(config: Config, data: Data) -> tuple[models.Classifier, dict]:
    """The public model for the private task (`public_model`, then `for_target`)."""
    source, info = public_model(config, data)
    return for_target(source, config, data), info


@torch.no_grad()
def source_predictions(source: models.Classifier, classes: list[int], x: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Target labels the public model predicts with its own source head: the argmax head index
    mapped back to its class label (a class outside the source task is never predicted)."""
    source.eval()
    xs = torch.from_numpy(np.ascontiguousarray(x))
    heads = torch.cat([source(xs[i: i + batch_size]).argmax(1) for i in range(0, len(xs), batch_size)])
    return np.asarray(classes, np.int64)[heads.numpy()]
