"""One interface for every unlearning method compared side by side (`dpsisa baselines`).

A method has a training-time part (`recorder`: a step hook attached while the original model
trains, e.g. amnesiac unlearning's stored updates) and an unlearning-time part (`unlearn`: given
the original model, the forget ids and a seed, return the unlearned model). Rows whose training
differs from the shared original (`sisa`, `dp_nothing`, `deltagrad`) train their own original
inside `unlearn` and return their own oracle (that procedure retrained without the forget set);
the others are compared with the shared `retrain` oracle. Exact rows (`retrain`, `sisa`) define
`oracle(problem, seed)` and are scored against it at independent seeds: compared with their own
seeds they would equal their oracle by construction. Everything here is plain torch: the
runner makes each (method, seed) a Ray task.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from pipeline.config import Config
from pipeline.core.finetune import FinetunePlan
from pipeline.core.models import Classifier
from pipeline.core.privacy import Recipe
from pipeline.core.train import ShardTrainer, StepHook
from pipeline.errors import UserError

FAMILIES = ("exact", "certified", "approximate", "protection")


class BaselineError(UserError, ValueError):
    """A comparison request is impossible (unknown method, empty forget set, ...); the message names the fix."""


@dataclass
class Problem:
    """What every method gets. Row i of `x`/`y` is private sample id i; `train_order` is the
    order in which the original saw the ids (its single slice), so `retain_order` is the order a
    from-scratch retrain on the retain set uses (same recipe, same seeds)."""

    config: Config  # the comparison's config; `config.baselines` holds the methods' hyper-parameters
    pretrained: Classifier  # the public model: where every training here starts
    original: Classifier | None  # finetuned (full, non-DP) on all private ids; None while it trains
    plan: FinetunePlan  # the original's plan (strategy `full`)
    recipe: Recipe  # the original's recipe (non-DP, S=1, R=1): retrains reuse it
    x: np.ndarray
    y: np.ndarray
    train_order: np.ndarray  # int64 ids
    forget_ids: np.ndarray  # sorted int64 ids
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    forget_class: int | None = None  # class forgetting: every private sample of this class is forgotten
    workdir: str | None = None  # a folder the method may write to (rows that keep checkpoints)

    @property
    def retain_order(self) -> np.ndarray:
        """`train_order` without the forget ids, order kept."""
        return self.train_order[~np.isin(self.train_order, self.forget_ids)]

    def trainer(self, seed: int | None = None) -> ShardTrainer:
        """The original's trainer (same plan and recipe); `seed` varies only the seeded generators."""
        return ShardTrainer(self.pretrained, self.plan, self.recipe, self.config.seed if seed is None else seed, 0)

    def tensors(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels of `ids` as CPU tensors (writable copies)."""
        ids = np.asarray(ids, np.int64)
        return torch.from_numpy(np.array(self.x[ids], np.float32)), torch.from_numpy(np.asarray(self.y[ids], np.int64))

    def original_copy(self) -> Classifier:
        """A trainable deep copy of the original model (methods must never modify `original`)."""
        if self.original is None:
            raise RuntimeError("the original model is not trained yet")
        model = copy.deepcopy(self.original)
        for p in model.parameters():
            p.requires_grad_(True)
        return model.train()


@dataclass
class Outcome:
    """What `unlearn` returns. `models` is the unlearned predictor: one model, or an ensemble's
    members (mean softmax). `seconds` is the unlearning wall time; `storage_bytes` the extra
    bytes the method keeps for unlearning (stored updates, histories, checkpoints); `details`
    method-specific facts (JSON-able). Rows with their own training also return their own
    `oracle` (same length as `models`; for `sisa` the same-seed retrain with the replay's draws, an
    exactness check, not its yardstick), its name, how long it took, and their own original."""

    models: list[Classifier]
    seconds: float
    storage_bytes: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    oracle: list[Classifier] | None = None
    oracle_name: str = "retrain"
    oracle_seconds: float | None = None
    original: list[Classifier] | None = None


class Method:
    """Base class: subclass, set `name`, `family`, `description`, implement `unlearn`; register
    with `@register`. Override `recorder` for a training-time part."""

    name: ClassVar[str]
    family: ClassVar[str] = "approximate"
    description: ClassVar[str] = ""

    def recorder(self, problem: Problem) -> Recorder | None:
        """A hook for the original's training (None: nothing to record)."""
        return None

    def unlearn(self, problem: Problem, seed: int, record: Any | None = None) -> Outcome:
        raise NotImplementedError

    def oracle(self, problem: Problem, seed: int) -> Outcome | None:
        """Exact rows: this row's procedure retrained from scratch without the forget set with `seed`. The
        runner calls it with seeds s+K … s+2K−1, none of the row's own, so an exact row is scored against
        independently seeded oracles (as `dpsisa score` does) rather than against itself. None (default):
        the row is compared with the oracle its `unlearn` returns, else with the shared `retrain` runs."""
        return None


class Recorder(StepHook):
    """A training-time step hook whose `record()` is shipped (pickled) to the unlearning task."""

    def record(self) -> Any:
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.family not in FAMILIES:
        raise ValueError(f"{cls.__name__}.family must be one of {FAMILIES}")
    METHODS[cls.name] = cls
    return cls


def get(name: str) -> Method:
    if name not in METHODS:
        raise BaselineError(f"unknown method '{name}'; choose from {', '.join(METHODS)}.")
    return METHODS[name]()


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor / numpy array inside nested dicts, lists and tuples (storage accounting)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def sgd(params: list[nn.Parameter], config: Config, lr: float | None = None) -> torch.optim.SGD:
    """Report 003's optimiser for unlearning updates: SGD(lr, momentum 0.9, weight decay 5e-4)."""
    b = config.baselines
    return torch.optim.SGD(params, lr=b.lr if lr is None else lr, momentum=b.momentum, weight_decay=b.weight_decay)


def batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A seeded shuffle of range(n) cut into mini-batches."""
    order = torch.randperm(n, generator=generator)
    return [order[i: i + batch_size] for i in range(0, n, batch_size)]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    import time

    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start
