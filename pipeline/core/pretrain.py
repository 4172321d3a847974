"""Pretrain the public model once (no DP: public data) and cache it by a hash of what defines it."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import Config, digest
from pipeline.core import models
from pipeline.core.checkpoints import load_torch, save_torch
from pipeline.data.datasets import Data


def cache_dir(config: Config) -> Path:
    root = config.pretrain.cache_dir or os.environ.get("DPSISA_CACHE") or Path.home() / ".cache" / "dpsisa"
    return Path(root) / "pretrained"


def seed(config: Config) -> int:
    """The pretraining seed: `pretrain.seed`, or the run's seed when unset."""
    return config.seed if config.pretrain.seed is None else config.pretrain.seed


def cache_key(config: Config, data: Data, model: torch.nn.Module) -> str:
    """Everything that changes the pretrained weights, and nothing else (not ε, shards, ...);
    the architecture enters as its parameter names and shapes, so a code change never loads stale weights."""
    d, m, p = config.data, config.model, config.pretrain
    architecture = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    return digest("v2", architecture, d.name, d.public, d.public_size if d.public == "heldout" else None, m.name, m.width,
                  p.epochs, p.lr, p.batch_size, p.augment, seed(config), data.input_shape, int(data.public.y.max() + 1))


def augment(x: torch.Tensor, gen: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Per-sample random horizontal flip and translation by up to `shift` pixels (background fill)."""
    n, c, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (shift,) * 4, value=float(x.min()))
    dy, dx = (torch.randint(0, 2 * shift + 1, (n,), generator=gen) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def _fit(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, config: Config, log) -> None:
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
        log(f"  pretrain epoch {epoch + 1}/{p.epochs}: loss {total / len(xs):.4f} ({time.perf_counter() - start:.1f}s)")


def pretrained_model(config: Config, data: Data, log=print) -> tuple[models.Classifier, dict]:
    """The public model for the private task: loaded from cache, or trained and cached.

    When the public data is another data set (e.g. CIFAR-100 for CIFAR-10) the head is
    re-initialised (seeded) for the private classes."""
    public_classes = int(data.public.y.max() + 1)
    model = models.build(config.model.name, data.input_shape, public_classes, config.model.width, seed(config))
    key = cache_key(config, data, model)
    path = cache_dir(config) / f"{config.model.name}-{key}.pt"
    info = {"cache_key": key, "path": str(path), "cached": path.is_file()}
    if path.is_file():
        model.load_state_dict(load_torch(path))
        log(f"pretrained model: cache hit {path}")
    else:
        log(f"pretraining {config.model.name} on {len(data.public.y)} public samples "
            f"({config.pretrain.epochs} epochs, cached at {path}) ...")
        start = time.perf_counter()
        _fit(model, data.public.x, data.public.y, config, log)
        info["seconds"] = time.perf_counter() - start
        save_torch(path, model.state_dict())
    if public_classes != data.num_classes or config.data.public != "heldout":
        torch.manual_seed(seed(config) + 1)
        model.fc = torch.nn.Linear(model.fc.in_features, data.num_classes)
    return model.eval(), info
