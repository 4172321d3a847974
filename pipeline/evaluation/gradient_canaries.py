"""Gradient canaries for the white-box audit: units that are gradients, not data (`train.GradientInjection`).

Canary i is the vector s_i·C·e_{k_i}: norm C on its own trainable coordinate k_i (distinct coordinates,
random signs s_i: orthonormal directions, a "Dirac" canary), included by a fair coin. At every DP step
an included canary is Poisson-sampled at the step's rate, like a sample (or a person) of slice 0, and
its gradient is appended to the step's per-unit gradients before Opacus clips them (it already has
norm C) and adds the noise. The auditor records, per step, the clipped data-gradient sum at the canary
coordinates (before any canary is added) and the noisy summed gradient after the noise; their
difference projected on s_i·e_{k_i}, in units of C, is canary i's per-step observation y_{t,i} =
(1 if in and sampled) + σ·z: no data gradient and no other canary reaches that coordinate.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.core.train import stage_seed
from pipeline.errors import UserError

SAMPLING_PURPOSE = "gradient-canaries"


class GradientCanaryError(UserError, ValueError):
    """More canaries than the trainable coordinates can hold in orthonormal directions."""


class GradientCanaries:
    """`count` Dirac canaries over the trainable coordinates `shapes` (name → shape, in model order;
    `masks` name → bool mask of the coordinates that train), seeded by `seed`; see the module docstring."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], masks: dict[str, torch.Tensor], count: int, norm: float,
                 seed: int, shard: int = 0):
        sizes = {n: int(np.prod(s)) for n, s in shapes.items()}
        offsets = np.cumsum([0, *sizes.values()])[:-1]
        allowed = np.concatenate([
            off + (np.flatnonzero(masks[n].reshape(-1).cpu().numpy()) if n in masks else np.arange(sizes[n]))
            for n, off in zip(sizes, offsets)]) if sizes else np.zeros(0, np.int64)
        if isinstance(count, bool) or not isinstance(count, int) or not 2 <= count <= len(allowed) // 2:
            raise GradientCanaryError(
                f"--canaries {count}: white-box canaries need 2..{len(allowed) // 2} (half of the {len(allowed)} "
                "trainable parameters, one orthonormal direction each); lower --canaries or set finetune.strategy=full.")
        rng = np.random.default_rng([seed, shard, 0xCA7A])
        self.count, self.norm, self.seed, self.shard = count, float(norm), seed, shard
        self.trainable_parameters = len(allowed)
        self.coordinates = rng.choice(allowed, size=count, replace=False)
        self.signs = rng.choice(np.array([-1.0, 1.0]), size=count)
        self.included = rng.random(count) < 0.5
        owner = np.searchsorted(offsets, self.coordinates, side="right") - 1
        names = list(sizes)
        # per parameter: (canary numbers, flat positions inside the parameter)
        self._where = {names[j]: (np.flatnonzero(owner == j), self.coordinates[owner == j] - offsets[j])
                       for j in np.unique(owner)}
        self._stage, self._sampler = None, None
        self._clean, self._rate = np.zeros(count), 0.0
        self.projections: list[np.ndarray] = []  # per step: y_{t,i} in units of C
        self.rates: list[float] = []  # per step: the Poisson rate
        self.samplings = 0  # canary gradients added, over all steps

    def _sample(self, stage: int, rate: float) -> np.ndarray:
        if stage != self._stage:
            self._stage = stage
            self._sampler = torch.Generator().manual_seed(stage_seed(self.seed, self.shard, stage, SAMPLING_PURPOSE))
        drawn = (torch.rand(self.count, generator=self._sampler) < rate).numpy()
        return np.flatnonzero(drawn & self.included)

    def add(self, stage: int, sample_rate: float, names: list[str], params: list[nn.Parameter], private: bool,
            max_grad_norm: float, batch_size: int) -> None:
        """Record the data's (clipped, with DP) gradient sum at the canary coordinates, then add the sampled canaries."""
        chosen = self._sample(stage, sample_rate)
        self.samplings += len(chosen)
        self._rate = float(sample_rate)
        self._clean[:] = 0.0
        if private:
            grads = [p.grad_sample for p in params]
            n = len(grads[0]) if grads else 0
            if n:
                norms = torch.stack([g.reshape(n, -1).norm(2, dim=1) for g in grads], dim=1).norm(2, dim=1)
                clip = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0).double()  # Opacus' per-unit clip factor
        for name, p in zip(names, params):
            if name not in self._where:
                if private:
                    p.grad_sample = torch.cat([p.grad_sample, p.grad_sample.new_zeros((len(chosen), *p.shape))])
                continue
            canaries, positions = self._where[name]
            where = torch.from_numpy(positions).to(p.device)
            values = torch.from_numpy(self.signs[canaries] * self.norm).to(p.device, p.dtype)
            mine = np.isin(canaries, chosen)
            picked = torch.from_numpy(mine).to(p.device)
            if private:
                if n:
                    self._clean[canaries] = (clip @ p.grad_sample.reshape(n, -1)[:, where].double()).cpu().numpy()
                rows = p.grad_sample.new_zeros((len(chosen), p.numel()))
                row_of = {int(c): r for r, c in enumerate(chosen)}
                row = torch.tensor([row_of[int(c)] for c in canaries[mine]], dtype=torch.long, device=p.device)
                rows[row, where[picked]] = values[picked]
                p.grad_sample = torch.cat([p.grad_sample, rows.view(len(chosen), *p.shape)])
            else:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self._clean[canaries] = p.grad.reshape(-1)[where].double().cpu().numpy() * batch_size
                flat = p.grad.view(-1)
                flat[where[picked]] += values[picked] / batch_size

    def observe(self, names: list[str], params: list[nn.Parameter], batch_size: int) -> None:
        """The step's update, less the recorded data sum, projected on each canary's direction (units of C)."""
        noisy = np.zeros(self.count)
        for name, p in zip(names, params):
            if name in self._where:
                canaries, positions = self._where[name]
                flat = p.grad.reshape(-1)[torch.from_numpy(positions).to(p.device)]
                noisy[canaries] = flat.double().cpu().numpy() * batch_size
        self.projections.append(self.signs * (noisy - self._clean) / self.norm)
        self.rates.append(self._rate)

    def per_step(self) -> np.ndarray:
        """Observations y (M × T), in units of C."""
        return np.stack(self.projections, axis=1) if self.projections else np.zeros((self.count, 0))
