"""What the approximate methods share: an editing session over a copy of the original (seeded retain /
forget batches, retain epochs, forget ascent, interleaving, a cosine-scheduled finetune), per-architecture
blocks ("last block", "early layers"), and `Approximate`, the Method base that times a session."""
from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.baselines.base import BaselineError, Method, Outcome, Problem, batches, sgd
from pipeline.config import BaselinesConfig
from pipeline.core.models import BasicBlock, Classifier


def blocks(model: Classifier) -> list[list[nn.Parameter]]:
    """The backbone's trainable units, input to output. gn_cnn: each conv + its GroupNorm; resnet18_gn:
    the stem, then each stage (two BasicBlocks, report 003's `layer1`..`layer4`); mlp: the hidden Linear."""
    layers = list(model.features)
    if any(isinstance(m, BasicBlock) for m in layers):
        body = [m for m in layers if isinstance(m, BasicBlock)]
        stem = layers[: layers.index(body[0])]
        units = [stem] + [body[i: i + 2] for i in range(0, len(body), 2)]
    elif any(isinstance(m, nn.Conv2d) for m in layers):
        starts = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)] + [len(layers)]
        units = [layers[a:b] for a, b in zip(starts, starts[1:])]
    else:
        units = [[m] for m in layers if isinstance(m, nn.Linear)]
    params = [[p for m in unit for p in m.parameters()] for unit in units]
    if not params:
        raise BaselineError(f"cannot find the blocks of {type(model.features).__name__}; add the architecture to blocks().")
    return params


def last_block(model: Classifier) -> list[nn.Parameter]:
    """The last backbone unit plus the head: what selective finetuning trains (report 003: `layer4` + `fc`)."""
    return blocks(model)[-1] + list(model.fc.parameters())


def early_blocks(model: Classifier) -> list[nn.Parameter]:
    """The first half of the units, rounded up (resnet18_gn: stem, `layer1`, `layer2`): Hybrid-4 freezes them at first."""
    units = blocks(model)
    return [p for unit in units[: (len(units) + 1) // 2] for p in unit]


def set_trainable(model: nn.Module, params: list[nn.Parameter] | None) -> None:
    """Only `params` get gradients (None: every parameter); frozen ones are skipped by SGD (no grad, no decay)."""
    keep = None if params is None else {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(keep is None or id(p) in keep)


def cosine(optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.CosineAnnealingLR:
    """Report 003's schedule for its finetuning phases: cosine annealing over `epochs`, stepped once per epoch."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))


def step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One SGD step minimising `loss`."""
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@dataclass
class Session:
    """One unlearning run: the model being edited (a copy of the original unless given), the retain and forget
    tensors, one seeded generator for every batch order, and the wall-clock start."""

    problem: Problem
    seed: int
    model: Classifier
    retain: tuple[torch.Tensor, torch.Tensor]
    forget: tuple[torch.Tensor, torch.Tensor]
    generator: torch.Generator
    start: float  # perf_counter() when the unlearning began

    @classmethod
    def open(cls, problem: Problem, seed: int, model: Classifier | None = None, start: float | None = None) -> Session:
        """`start`: when the unlearning began (default now); `model`: what to edit (default a copy of the original)."""
        start = time.perf_counter() if start is None else start
        if len(problem.forget_ids) == 0 or len(problem.retain_order) == 0:
            raise BaselineError("approximate unlearning needs a non-empty forget set and a non-empty retain set.")
        torch.manual_seed(seed)
        model = problem.original_copy() if model is None else model
        return cls(problem, seed, model, problem.tensors(problem.retain_order), problem.tensors(problem.forget_ids),
                   torch.Generator().manual_seed(seed), start)

    @property
    def config(self) -> BaselinesConfig:
        return self.problem.config.baselines

    def loss(self, data: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the edited model on rows `idx` of `data`."""
        return F.cross_entropy(self.model(data[0][idx]), data[1][idx])

    def optimizer(self, params: list[nn.Parameter] | None = None, lr: float | None = None) -> torch.optim.SGD:
        """`base.sgd` over `params` (default every parameter), at `lr` (default `baselines.lr`)."""
        return sgd(list(self.model.parameters()) if params is None else params, self.problem.config, lr)

    def epoch(self, optimizer: torch.optim.Optimizer, data: tuple[torch.Tensor, torch.Tensor], scale: float = 1.0) -> None:
        """One pass over `data` in seeded mini-batches minimising scale × CE (scale < 0: gradient ascent)."""
        for idx in batches(len(data[1]), self.config.batch_size, self.generator):
            step(optimizer, scale * self.loss(data, idx))

    def pairs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One retain epoch's batch indices, each paired with a forget batch; the (usually much smaller) forget
        set is cycled, reshuffled on every pass, so every retain batch has a partner."""
        n, size = len(self.forget[1]), self.config.batch_size
        forget = itertools.chain.from_iterable(batches(n, size, self.generator) for _ in itertools.count())
        for idx in batches(len(self.retain[1]), self.config.batch_size, self.generator):
            yield idx, next(forget)

    def interleaved(self, optimizer: torch.optim.Optimizer, reverse_scale: float) -> None:
        """Report 003's frequent alternation: per retain batch one descent step, then one step on a forget
        batch minimising −reverse_scale × CE."""
        for r, f in self.pairs():
            step(optimizer, self.loss(self.retain, r))
            step(optimizer, -reverse_scale * self.loss(self.forget, f))

    def finetune(self, epochs: int, params: list[nn.Parameter] | None = None) -> None:
        """A retain finetuning phase: a fresh SGD over `params` (default all) with a cosine schedule over `epochs`."""
        set_trainable(self.model, params)
        optimizer = self.optimizer(params)
        schedule = cosine(optimizer, epochs)
        for _ in range(epochs):
            self.epoch(optimizer, self.retain)
            schedule.step()
        set_trainable(self.model, None)

    def done(self, **details: Any) -> Outcome:
        """The edited model in eval mode and the wall time since `open`. Storage is 0: nothing is kept for unlearning."""
        set_trainable(self.model, None)
        return Outcome([self.model.eval()], time.perf_counter() - self.start, 0, details)


class Approximate(Method):
    """An approximate method in two parts: `session` (what to edit; default a copy of the original) and `run`
    (edit it in place, return the details); `unlearn` times both and stores nothing (storage 0)."""

    family = "approximate"

    def session(self, problem: Problem, seed: int) -> Session:
        return Session.open(problem, seed)

    def run(self, s: Session) -> dict[str, Any]:
        raise NotImplementedError

    def unlearn(self, problem: Problem, seed: int, record: Any = None) -> Outcome:
        s = self.session(problem, seed)
        return s.done(**self.run(s))
