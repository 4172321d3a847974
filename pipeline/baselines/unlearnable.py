"""Unlearnable examples: sample-wise error-minimizing noise (Huang et al., ICLR 2021).

Huang, Ma, Erfani, Bailey, Wang, "Unlearnable Examples: Making Personal Data Unexploitable",
ICLR 2021. A data owner adds to each of her images an imperceptible perturbation δ (‖δ‖∞ ≤ ε in
pixel space) that *minimises* a model's training loss, so the image carries an easy shortcut and
a model trained on it learns (almost) nothing that transfers to clean data. Seed 002 uses this as
"augmentation for exact unlearning": a protected part Du is made unlearnable, and a model trained
on Dc ∪ Du is compared with one trained on the clean part Dc alone, as the share of Du grows.

Everything here is plain torch (no Ray). δ lives in pixel units; the models see normalised
inputs, so x_norm + δ / std is what they are fed, and the returned noise is in normalised units.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.baselines.base import BaselineError
from pipeline.baselines.results import UnlearnableResult
from pipeline.config import Config
from pipeline.core.models import build
from pipeline.core.train import resolve_device, stage_seed
from pipeline.data import datasets

logger = logging.getLogger(__name__)

DEFAULT_FRACTIONS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
STOP_ACCURACY = 0.99  # Huang et al.'s stop condition: error of the noise model on x + δ below 1%
TRAIN_STEPS = 10  # Huang et al.'s `train_step`: model mini-batches per round of the min-min alternation
EVAL_CHUNK = 1024


def _channel(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def _bounds(x: torch.Tensor, budget: float, mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise [lo, hi] for δ in normalised units: the pixel L∞ ball of `budget` (ε / std per
    channel) intersected with the valid pixel range [0, 1] of x + δ."""
    s, m = _channel(std, x), _channel(mean, x)
    lo = torch.maximum(-budget / s, (0.0 - m) / s - x)
    hi = torch.minimum(budget / s, (1.0 - m) / s - x)
    return lo, hi.clamp_min(lo)  # x is in range, so lo ≤ 0 ≤ hi up to rounding


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    return [order[i: i + batch_size] for i in range(0, n, batch_size)]


def _optimiser(model: nn.Module, config: Config) -> torch.optim.SGD:
    """SGD with the run's `train.lr` and `train.momentum` and report 003's weight decay (baselines.weight_decay)."""
    return torch.optim.SGD(model.parameters(), lr=config.train.lr, momentum=config.train.momentum,
                           weight_decay=config.baselines.weight_decay)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of rows of x that `model` classifies as y (chunked forward passes)."""
    model.eval()
    hits = sum(int((model(x[i: i + EVAL_CHUNK]).argmax(1) == y[i: i + EVAL_CHUNK]).sum()) for i in range(0, len(y), EVAL_CHUNK))
    return hits / max(1, len(y))


def error_minimizing_noise(model: nn.Module, x: torch.Tensor, y: torch.Tensor, budget: float, steps: int, rounds: int, *,
                           mean: Sequence[float], std: Sequence[float], optimizer: torch.optim.Optimizer, batch_size: int,
                           generator: torch.Generator, train_steps: int = TRAIN_STEPS, stop_accuracy: float = STOP_ACCURACY,
                           ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Sample-wise error-minimizing noise δ (one per row of x) by the min-min bi-level search of
    Huang et al. 2021, min_θ E[min_{‖δ‖∞≤ε} CE(f_θ(x + δ), y)], exactly as their reference code:

    1. δ starts uniform in [-ε, ε] pixels (drawn from `generator`), projected to valid pixels.
    2. Each round: (a) train `model` with `optimizer` for `train_steps` mini-batches of (x + δ, y)
       (a seeded reshuffled stream over all rows); (b) for every mini-batch of rows, `steps` PGD
       *descent* steps δ ← Π(δ − α·sign(∇_δ CE(f_θ(x + δ), y))) with α = 2ε / steps (Huang's
       CIFAR setting, 20 steps of 0.8/255 at ε = 8/255, also travels 2ε), where Π clips to the
       pixel L∞ ball of radius ε and to x + δ ∈ [0, 1] pixels; (c) measure the model's accuracy on
       x + δ over all rows.
    3. Stop after the first round whose accuracy is ≥ `stop_accuracy` (Huang: error < 1%), or
       after `rounds` rounds, whichever comes first.

    `x` is normalised ((pixel − mean) / std per channel); `budget` ε is in pixels ([0, 1] scale).
    Returns δ in normalised units (feed x + δ; |δ · std| ≤ ε) and facts: rounds run, and the final
    model's accuracy on x + δ (`train_accuracy`), mean CE on x + δ (`loss`) and on clean x (`clean_loss`)."""
    if budget < 0 or steps < 1 or rounds < 1 or train_steps < 0:
        raise BaselineError("unlearnable noise needs budget ≥ 0, steps ≥ 1, rounds ≥ 1 (baselines.unlearnable_*).")
    x, y = x.detach(), y.detach()
    s = _channel(std, x)
    lo, hi = _bounds(x, budget, mean, std)
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    delta = torch.maximum(torch.minimum((2 * u - 1) * budget / s, hi), lo)
    step = 2.0 * budget / steps / s  # α per channel, in normalised units
    stream: list[torch.Tensor] = []
    facts: dict[str, Any] = {"rounds": 0}
    for r in range(rounds):
        model.train()
        for _ in range(train_steps):
            if not stream:
                stream = _batches(len(y), batch_size, generator)
            idx = stream.pop(0).to(x.device)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx] + delta[idx]), y[idx]).backward()
            optimizer.step()
        model.eval()
        frozen = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)  # the noise update needs ∂/∂δ only
        for i in range(0, len(y), batch_size):
            xb, yb, d = x[i: i + batch_size], y[i: i + batch_size], delta[i: i + batch_size].clone()
            for _ in range(steps):
                d.requires_grad_(True)
                (grad,) = torch.autograd.grad(F.cross_entropy(model(xb + d), yb), d)
                d = torch.maximum(torch.minimum(d.detach() - step * grad.sign(), hi[i: i + batch_size]), lo[i: i + batch_size])
            delta[i: i + batch_size] = d.detach()
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
        facts.update(rounds=r + 1, train_accuracy=accuracy(model, x + delta, y), loss=_loss(model, x + delta, y),
                     clean_loss=_loss(model, x, y))
        logger.info(f"unlearnable noise round {r + 1}/{rounds}: accuracy on x+δ {facts['train_accuracy']:.4f}, "
                f"CE on x+δ {facts['loss']:.4f} vs on clean x {facts['clean_loss']:.4f}")
        if facts["train_accuracy"] >= stop_accuracy:
            break
    return delta, facts


@torch.no_grad()
def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    total = sum(float(F.cross_entropy(model(x[i: i + EVAL_CHUNK]), y[i: i + EVAL_CHUNK], reduction="sum"))
                for i in range(0, len(y), EVAL_CHUNK))
    return total / max(1, len(y))


def train_from_scratch(config: Config, x: torch.Tensor, y: torch.Tensor, input_shape: tuple[int, ...], num_classes: int,
                       purpose: str = "compare") -> nn.Module:
    """A fresh `model.*` (initial weights seeded by config.seed alone) trained for
    baselines.unlearnable_epochs epochs of shuffled mini-batches of train.batch_size with `_optimiser`.
    Every compared model of one run shares the initial weights and the shuffle seed."""
    model = build(config.model.name, input_shape, num_classes, config.model.width, stage_seed(config.seed, 0, 0, f"{purpose}/init"))
    model = model.to(x.device).train()
    optimizer = _optimiser(model, config)
    generator = torch.Generator().manual_seed(stage_seed(config.seed, 0, 0, f"{purpose}/order"))
    for _ in range(config.baselines.unlearnable_epochs):
        for idx in _batches(len(y), config.train.batch_size, generator):
            idx = idx.to(x.device)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model.eval()


def check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    """The fractions as floats, or BaselineError: each in [0, 1], at least one, no duplicates."""
    out = tuple(float(f) for f in fractions)
    if not out:
        raise BaselineError("give at least one unlearnable fraction, e.g. 0,0.2,0.4,0.6,0.8,1.")
    bad = [f for f in out if not 0.0 <= f <= 1.0]
    if bad:
        raise BaselineError(f"unlearnable fractions must lie in [0, 1]; got {bad[0]} (e.g. write 0.2, not 20).")
    if len(set(out)) != len(out):
        raise BaselineError(f"unlearnable fractions must not repeat; got {', '.join(map(str, out))}.")
    return out


def run_unlearnable(config: Config, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                    data: datasets.Data | None = None, random_control: bool = True) -> UnlearnableResult:
    """Seed 002's experiment: how much does an unlearnable part Du spoil (or not) a model trained
    from scratch on Dc ∪ Du, compared with one trained on the clean part Dc alone?

    The noise is made ONCE for the whole private set (one noise model, `error_minimizing_noise`
    with baselines.unlearnable_budget / _steps / _rounds); each fraction f then takes Du = the first
    round(f·n) ids of one seeded permutation (so the Du are nested as f grows) and trains two models
    from scratch with identical initial weights, shuffle seed and schedule (`train_from_scratch`):
    (a) on Dc only, (b) on Dc ∪ (Du + δ). Both report clean-test accuracy. At f = 0 Du is empty and
    (a) and (b) are the same training run, so one model is trained and both columns hold its
    accuracy; at f = 1 Dc is empty and (a) is reported as None (null). `random_control` also
    trains one model on the whole private set plus uniform random noise of the same budget
    (Huang et al.'s control: random noise should not hurt). Sets torch threads to train.threads."""
    fractions = check_fractions(fractions)
    b = config.baselines
    torch.set_num_threads(config.train.threads)
    device = resolve_device(config.train.device)
    data = data or datasets.load(config.data)
    mean, std = datasets.NORMALISATION[data.name]
    x = torch.from_numpy(np.array(data.private.x, np.float32)).to(device)
    y = torch.from_numpy(np.asarray(data.private.y, np.int64)).to(device)
    x_test = torch.from_numpy(np.array(data.test.x, np.float32)).to(device)
    y_test = torch.from_numpy(np.asarray(data.test.y, np.int64)).to(device)
    n, shape = len(y), data.input_shape
    logger.info(f"unlearnable examples on {data.name}: {n} private, {len(y_test)} test samples, ε = {b.unlearnable_budget:.5f} pixels")

    start = time.perf_counter()
    noise_model = build(config.model.name, shape, data.num_classes, config.model.width, stage_seed(config.seed, 0, 0, "noise/init"))
    noise_model = noise_model.to(device)
    generator = torch.Generator().manual_seed(stage_seed(config.seed, 0, 0, "noise/search"))
    delta, facts = error_minimizing_noise(noise_model, x, y, b.unlearnable_budget, b.unlearnable_steps, b.unlearnable_rounds,
                                          mean=mean, std=std, optimizer=_optimiser(noise_model, config),
                                          batch_size=config.train.batch_size, generator=generator)
    noise_seconds = time.perf_counter() - start
    logger.info(f"noise made in {noise_seconds:.1f}s ({facts['rounds']} rounds), noise model accuracy on x+δ "
                f"{facts['train_accuracy']:.4f}")

    order = torch.randperm(n, generator=torch.Generator().manual_seed(stage_seed(config.seed, 0, 0, "unlearnable/subset")))
    rows = []
    for f in fractions:
        t0 = time.perf_counter()
        n_u = int(round(f * n))
        unl = order[:n_u].to(device)
        is_unl = torch.zeros(n, dtype=torch.bool, device=device)
        is_unl[unl] = True
        mixed = x.clone()
        mixed[is_unl] += delta[is_unl]
        both = train_from_scratch(config, mixed, y, shape, data.num_classes)
        with_acc = accuracy(both, x_test, y_test)
        if n_u == 0:
            clean_acc: float | None = with_acc  # Du empty: (a) is the same training run as (b)
        elif n_u == n:
            clean_acc = None  # Dc empty: nothing to train on
        else:
            clean_acc = accuracy(train_from_scratch(config, x[~is_unl], y[~is_unl], shape, data.num_classes), x_test, y_test)
        row = {"fraction": f, "unlearnable_samples": n_u, "clean_samples": n - n_u, "clean_only_accuracy": clean_acc,
               "with_unlearnable_accuracy": with_acc, "with_unlearnable_train_accuracy": accuracy(both, mixed, y),
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        shown = "n/a (Dc empty)" if clean_acc is None else f"{clean_acc:.4f}"
        logger.info(f"fraction {f:.2f}: |Du| {n_u}, |Dc| {n - n_u}; test accuracy Dc only {shown}, "
            f"Dc+Du {with_acc:.4f} ({row['seconds']:.1f}s)")

    facts_out = dict(rows=rows, budget=b.unlearnable_budget, steps=b.unlearnable_steps, rounds=b.unlearnable_rounds,
                     noise_rounds=facts["rounds"], noise_seconds=noise_seconds, noise_train_accuracy=facts["train_accuracy"],
                     noise_loss=facts["loss"], noise_clean_loss=facts["clean_loss"], dataset=data.name, private_samples=n,
                     test_samples=len(y_test), epochs=b.unlearnable_epochs, model=config.model.name)
    if not random_control:
        return UnlearnableResult(**facts_out)
    g = torch.Generator().manual_seed(stage_seed(config.seed, 0, 0, "unlearnable/random"))
    lo, hi = _bounds(x, b.unlearnable_budget, mean, std)
    u = torch.rand(x.shape, generator=g).to(device)
    noisy = x + torch.maximum(torch.minimum((2 * u - 1) * b.unlearnable_budget / _channel(std, x), hi), lo)
    random_accuracy = accuracy(train_from_scratch(config, noisy, y, shape, data.num_classes), x_test, y_test)
    logger.info(f"control: all {n} private samples with uniform random noise of the same budget → test accuracy "
                f"{random_accuracy:.4f}")
    return UnlearnableResult(**facts_out, random_noise_accuracy=random_accuracy)
