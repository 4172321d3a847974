"""Report 003's unlearning by finetuning and gradient reversal (Dhinakaran 2024, "Efficient Machine Unlearning
for Deep Neural Networks", seeds/003): Models 1-6 and the final hybrid. Every method edits a copy of the original
with `base.sgd` (lr 0.001, momentum 0.9, weight decay 5e-4) and seeded batch orders, and stores nothing for
unlearning (storage 0). `Session`, `Approximate` and `blocks` are shared with `sota.py` and `distill.py`."""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.baselines.base import BaselineError, Method, Outcome, Problem, batches, register, sgd
from pipeline.config import BaselinesConfig
from pipeline.models import BasicBlock, Classifier


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


@register
class Finetune(Approximate):
    """Report 003 Model 1 (after the NeurIPS 2023 unlearning challenge's starter kit): finetune every layer on the
    retain set with cosine annealing for `finetune_epochs`; forgetting relies on catastrophic forgetting only."""

    name = "finetune"
    description = "finetune all layers on the retain set (cosine LR), report 003"

    def run(self, s: Session) -> dict[str, Any]:
        s.finetune(s.config.finetune_epochs)
        return dict(epochs=s.config.finetune_epochs)


@register
class SelectiveFinetune(Approximate):
    """Report 003 Model 2: finetune only the last block and the head (`blocks`) on the retain set with cosine
    annealing for `finetune_epochs`; every other parameter stays bit-identical to the original."""

    name = "selective_finetune"
    description = "finetune the last block + head on the retain set (cosine LR), report 003"

    def run(self, s: Session) -> dict[str, Any]:
        params = last_block(s.model)
        s.finetune(s.config.finetune_epochs, params)
        return dict(epochs=s.config.finetune_epochs, trained_params=sum(p.numel() for p in params))


@register
class NegGrad(Approximate):
    """Report 003 Model 3 ("fine-tune the last layers on the retain set, then gradient reversal on the forget
    set"). Of `neggrad_epochs` E, the first ceil(E/2) finetune the last block + head on the retain set (cosine),
    the remaining floor(E/2) do gradient ascent (minimise −CE) on the forget set with a fresh SGD, same layers."""

    name = "neggrad"
    description = "retain finetune of the last layers, then gradient ascent on the forget set, report 003"

    def run(self, s: Session) -> dict[str, Any]:
        epochs = s.config.neggrad_epochs
        params = last_block(s.model)
        s.finetune(epochs - epochs // 2, params)
        set_trainable(s.model, params)
        optimizer = s.optimizer(params)
        for _ in range(epochs // 2):
            s.epoch(optimizer, s.forget, -1.0)
        return dict(retain_epochs=epochs - epochs // 2, ascent_epochs=epochs // 2)


@register
class Alternating(Approximate):
    """Report 003 Model 4: every epoch, one retain epoch of descent, then one forget epoch minimising
    −`alternating_reverse_scale` × CE (0.1); all layers, one SGD, constant learning rate (`alternating_epochs`)."""

    name = "alternating"
    description = "per epoch: retain finetune, then forget ascent scaled by 0.1, report 003"

    def run(self, s: Session) -> dict[str, Any]:
        optimizer = s.optimizer()
        for _ in range(s.config.alternating_epochs):
            s.epoch(optimizer, s.retain)
            s.epoch(optimizer, s.forget, -s.config.alternating_reverse_scale)
        return dict(epochs=s.config.alternating_epochs, reverse_scale=s.config.alternating_reverse_scale)


@register
class FrequentAlternating(Approximate):
    """Report 003 Model 5: every retain batch, one descent step, then one step on a (cycled) forget batch
    minimising −`frequent_reverse_scale` × CE (0.5); all layers, one SGD, constant LR, `frequent_epochs`."""

    name = "frequent_alternating"
    description = "per batch: retain step, then forget ascent step scaled by 0.5, report 003"
    final_finetune = False

    def run(self, s: Session) -> dict[str, Any]:
        b = s.config
        optimizer = s.optimizer()
        for _ in range(b.frequent_epochs):
            s.interleaved(optimizer, b.frequent_reverse_scale)
        final = b.final_finetune_epochs if self.final_finetune else 0
        s.finetune(final)
        return dict(epochs=b.frequent_epochs, reverse_scale=b.frequent_reverse_scale, final_finetune_epochs=final)


@register
class FrequentAlternatingFT(FrequentAlternating):
    """Report 003 Model 6: Model 5, then `final_finetune_epochs` of all-layer retain finetuning (cosine) to
    recover retain accuracy."""

    name = "frequent_alternating_ft"
    description = "frequent_alternating, then a final retain finetune, report 003"
    final_finetune = True


@register
class Hybrid(Approximate):
    """Report 003's final hybrid (Hybrid-4), built on Models 5/6 (the progress-phase models that forgot). For
    e = 0..E−1 (E = `hybrid_epochs`), one SGD, constant LR: per-batch alternation (Model 5) with reversal scale
    s_e = s0^(1−t)·s1^t, t = e/(E−1), growing exponentially from s0 = `alternating_reverse_scale` to
    s1 = `frequent_reverse_scale` (the report gives no constants; these are its two scales); a retain epoch
    after every `hybrid_finetune_every`-th epoch before the last (if E ≤ that period: once, after epoch E//2);
    the first half of the backbone units (resnet18_gn: stem, layer1, layer2) frozen until epoch
    ceil(`hybrid_unfreeze_at`·E). Then `final_finetune_epochs` of all-layer retain finetuning (cosine)."""

    name = "hybrid"
    description = "Hybrid-4: exponential reversal scale, periodic finetunes, late unfreezing, final finetune (report 003)"

    def run(self, s: Session) -> dict[str, Any]:
        b = s.config
        epochs, every = b.hybrid_epochs, max(1, b.hybrid_finetune_every)
        checkpoints = set(range(every, epochs, every)) or ({epochs // 2} if epochs >= 2 else set())
        unfreeze = math.ceil(b.hybrid_unfreeze_at * epochs)
        early = {id(p) for p in early_blocks(s.model)}
        optimizer = s.optimizer()
        scale = 0.0
        for e in range(epochs):
            set_trainable(s.model, None if e >= unfreeze else [p for p in s.model.parameters() if id(p) not in early])
            t = e / (epochs - 1) if epochs > 1 else 1.0
            scale = b.alternating_reverse_scale ** (1 - t) * b.frequent_reverse_scale ** t
            s.interleaved(optimizer, scale)
            if e + 1 in checkpoints:
                s.epoch(optimizer, s.retain)
        s.finetune(b.final_finetune_epochs)
        return dict(epochs=epochs, final_reverse_scale=scale, finetune_after=sorted(checkpoints),
                      unfreeze_epoch=min(unfreeze, epochs), final_finetune_epochs=b.final_finetune_epochs)
