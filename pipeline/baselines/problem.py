"""The comparison's shared setup: data, forget set, the public model, and the original model.

The original is the public model finetuned `full`, non-DP, as one model (S=1, R=1) with the
config's `train.*` schedule through the training core (`ShardTrainer`), so `retrain` and the
SISA path at S=1 can reproduce it bit for bit. Training-time recorders (amnesiac unlearning)
observe that one training run.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from pipeline.baselines.base import BaselineError, Problem, Recorder
from pipeline.config import Config, privacy_unit
from pipeline.core.finetune import plan_for
from pipeline.core.pretrain import pretrained_model
from pipeline.core.privacy import PrivacyError, make_recipe
from pipeline.data import datasets
from pipeline.data.partition import partition

logger = logging.getLogger(__name__)


def original_config(config: Config) -> Config:
    """The shared original's training: strategy `full`, no DP, one shard of one slice."""
    return config.with_overrides({"finetune.strategy": "full", "privacy.epsilon": None,
                                  "shards.count": 1, "shards.slices": 1})


def choose_forget(n: int, labels: np.ndarray, num_classes: int, seed: int, count: int | None = None,
                  fraction: float | None = None, forget_class: int | None = None) -> np.ndarray:
    """Sorted forget ids: `count` or `fraction` of the n private ids at random (seeded), or every id of a class."""
    given = [v is not None for v in (count, fraction, forget_class)]
    if sum(given) != 1:
        raise BaselineError("give exactly one of --forget N, --forget-fraction F, --forget-class C.")
    if forget_class is not None:
        if not 0 <= forget_class < num_classes:
            raise BaselineError(f"--forget-class {forget_class} does not exist; classes are 0..{num_classes - 1}.")
        ids = np.flatnonzero(labels == forget_class).astype(np.int64)
        if len(ids) == 0 or len(ids) == n:
            raise BaselineError(f"class {forget_class} has {len(ids)} of {n} private samples; pick another class.")
        return ids
    if fraction is not None:
        if not 0 < fraction < 1:
            raise BaselineError(f"--forget-fraction must be in (0, 1); got {fraction}.")
        count = max(1, int(round(fraction * n)))
    if count < 1:
        raise BaselineError(f"--forget must be at least 1; got {count}.")
    if count >= n:
        raise BaselineError(f"--forget {count} is not smaller than the private set ({n} ids); forget fewer "
                            "or raise data.private_limit.")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=count, replace=False)).astype(np.int64)


def load_problem(config: Config, count: int | None = None,
                 fraction: float | None = None, forget_class: int | None = None,
                 data: datasets.Data | None = None) -> Problem:
    """Data, forget set, pretrained model, plan and recipe; the original is not trained yet."""
    if privacy_unit(config) == "subject":  # refused up front, DP or not: the DP rows (dp_nothing, dp_retrain) need it
        raise PrivacyError("privacy.unit=subject needs the data subjects of each slice, and the baselines train one "
                           "slice of samples; set privacy.unit=sample here.")
    config = original_config(config)
    data = data or datasets.load(config.data)
    n = len(data.private.y)
    forget = choose_forget(n, data.private.y, data.num_classes, config.seed, count, fraction, forget_class)
    pretrained, _ = pretrained_model(config, data)
    order = partition(data.private.ids, data.private.y, 1, 1, "uniform", config.seed)["sample_id"]
    recipe = make_recipe(config, 0, [n])
    plan = plan_for(pretrained, "full")
    return Problem(config, pretrained, None, plan, recipe, data.private.x, data.private.y, np.asarray(order, np.int64),
                   forget, data.test.x, data.test.y, data.num_classes, forget_class)


class _Hooks:
    """Fan one training run's step events out to several recorders."""

    def __init__(self, recorders: list[Recorder]):
        self.recorders = recorders
        self.seconds = 0.0

    def before_step(self, *args) -> None:
        start = time.perf_counter()
        for r in self.recorders:
            r.before_step(*args)
        self.seconds += time.perf_counter() - start

    def after_step(self, *args) -> None:
        start = time.perf_counter()
        for r in self.recorders:
            r.after_step(*args)
        self.seconds += time.perf_counter() - start


def train_original(problem: Problem, recorders: dict[str, Recorder] | None = None) -> dict:
    """Train the original in place (`problem.original`); return timing (recording overhead apart)."""
    recorders = recorders or {}
    hooks = _Hooks(list(recorders.values())) if recorders else None
    trainer = problem.trainer()
    x, y = problem.x[problem.train_order], problem.y[problem.train_order]
    logger.info(f"original model: {problem.config.model.name} finetuned `full` on {len(y)} private ids "
        f"({problem.config.train.epochs:g} epoch(s), recorders: {', '.join(recorders) or 'none'})")
    start = time.perf_counter()
    torch.manual_seed(problem.config.seed)
    state = trainer.train([(x, y)], hook=hooks)
    seconds = time.perf_counter() - start
    problem.original = trainer.model(state)
    return {"seconds": seconds, "recording_seconds": hooks.seconds if hooks else 0.0}
