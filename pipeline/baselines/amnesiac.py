"""Amnesiac unlearning (Graves, Nagisetty & Ganesh, "Amnesiac Machine Learning", AAAI 2021) and
its per-sample variant (report 004, Marincione 2024, "Per-Sample Amnesiac Unlearning").

Both record while the shared original trains and undo by subtracting recorded parameter changes:

* `amnesiac_batch` stores every step's update u_t = θ_{t+1} − θ_t (the real change, momentum
  included, so it is optimiser-independent as in Graves et al.) and the ids of that step's batch;
  unlearning subtracts u_t of every batch that held a forget id. Storage O(N·E/B·M).
* `amnesiac_sample` keeps one fixed random subset of p·M trainable elements and, per sample i,
  ONE vector c_i: the total change sample i's gradients caused on those elements (see
  `SampleRecorder`); unlearning subtracts c_i of the forget ids. Storage O(N·p·M).

Both then run the short retain finetune the methods prescribe (Graves et al.'s "small amount of
additional training"; report 004 uses one too): `amnesiac_finetune_epochs` epochs of `base.sgd`.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from pipeline.baselines.base import BaselineError, Method, Outcome, Problem, Recorder, batches, register, sgd, tensor_bytes
from pipeline.core.models import Classifier

PER_SAMPLE_FLOATS = 2 ** 24  # per-sample gradient elements materialised at once (chunk × M), 64 MiB


def flat_params(params: list[nn.Parameter]) -> torch.Tensor:
    """The trainable parameters as one detached float32 CPU vector (names' order)."""
    return torch.cat([p.detach().reshape(-1).cpu() for p in params])


@torch.no_grad()
def subtract(model: nn.Module, names: list[str], delta: torch.Tensor, index: torch.Tensor | None = None) -> None:
    """θ[index] −= delta on the flat concatenation of the parameters `names` (index None: all
    elements). Done in float64 so that undoing many small updates adds no rounding of its own."""
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    flat = flat_params(params).double()
    if index is None:
        flat -= delta.double()
    else:
        flat[index] -= delta.double()
    offset = 0
    for p in params:
        p.copy_(flat[offset: offset + p.numel()].view_as(p).to(p.dtype))
        offset += p.numel()


def retain_finetune(model: Classifier, problem: Problem, seed: int, epochs: int) -> Classifier:
    """The short retain finetune after undoing: `epochs` epochs of `base.sgd` (report 003's optimiser)
    over seeded shuffles of the retain ids, mean cross-entropy, every parameter trainable."""
    if epochs > 0:
        config = problem.config
        x, y = problem.tensors(problem.retain_order)
        model.train()
        optimizer = sgd([p for p in model.parameters() if p.requires_grad], config)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for idx in batches(len(y), config.baselines.batch_size, generator):
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                optimizer.step()
    return model.eval()


def _require(record: Any, name: str) -> dict:
    if record is None:
        raise BaselineError(f"{name} needs its training-time record; train the original with its recorder attached.")
    return record


class BatchRecorder(Recorder):
    """Stores u_t = θ_{t+1} − θ_t (flat float32, all trainable elements) and the sample ids of step t."""

    def __init__(self, problem: Problem):
        self.order = problem.train_order
        self.names = list(problem.plan.trainable)
        named = dict(problem.pretrained.named_parameters())
        steps = sum(stage.steps for stage in problem.recipe.stages)
        self.updates = torch.zeros(steps, sum(named[n].numel() for n in self.names))  # preallocated: no 2× peak
        self.before: torch.Tensor | None = None
        self.ids: list[np.ndarray] = []

    def before_step(self, stage, positions, x, y, module, names, params) -> None:
        if list(names) != self.names:
            raise BaselineError("amnesiac_batch: the trained parameters differ from the plan's.")
        self.before = flat_params(params)
        self.ids.append(self.order[positions.cpu().numpy()])

    def after_step(self, stage, names, params) -> None:
        torch.sub(flat_params(params), self.before, out=self.updates[len(self.ids) - 1])

    def record(self) -> dict:
        done = len(self.ids)  # a view would pickle its whole storage: clone when training stopped early
        return {"names": self.names, "updates": self.updates if done == len(self.updates) else self.updates[:done].clone(),
                "ids": self.ids}


def kept_elements(problem: Problem, fraction: float) -> tuple[list[str], torch.Tensor]:
    """The trainable names and a sorted seeded random subset of round(p·M) ≥ 1 of their M elements
    (masked elements of a sparse plan excluded: they never change). Seeded by `config.seed`."""
    names = list(problem.plan.trainable)
    named = dict(problem.pretrained.named_parameters())
    allowed = torch.cat([problem.plan.masks[n].reshape(-1) if n in problem.plan.masks
                         else torch.ones(named[n].numel(), dtype=torch.bool) for n in names])
    candidates = allowed.nonzero().squeeze(1)
    k = min(len(candidates), max(1, int(round(fraction * allowed.numel()))))
    generator = torch.Generator().manual_seed(problem.config.seed)
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:k]]
    return names, chosen.sort().values


def per_sample_grads(module: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[len(x), len(index)]: ∇_θ CE(module(x_i), y_i) of each sample alone at the module's current
    θ (its trainable parameters, flattened in order), on the flat elements `index`."""
    trainable = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    total = sum(p.numel() for p in trainable.values())

    def loss(theta: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(module, theta, (xi.unsqueeze(0),)), yi.unsqueeze(0), reduction="sum")

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    chunk = max(1, PER_SAMPLE_FLOATS // total)
    rows = []
    for xs, ys in zip(x.split(chunk), y.split(chunk)):
        g = per_sample(trainable, xs, ys)
        rows.append(torch.cat([g[n].reshape(len(xs), -1) for n in trainable], 1)[:, index.to(xs.device)].cpu())
    return torch.cat(rows) if rows else torch.zeros(0, len(index))


class SampleRecorder(Recorder):
    """One vector per sample: c_i = −Σ_{t: i ∈ B_t} w_t · ∇ℓ_i(θ_t)[kept], with ℓ_i its cross-entropy
    and w_t = (lr/B) · (1 − μ^{T−t}) / (1 − μ).

    Why w_t: the original's step is v_{t+1} = μ v_t + g_t, θ_{t+1} = θ_t − lr·v_{t+1} with
    g_t = (1/B) Σ_{i∈B_t} ∇ℓ_i(θ_t) (B the expected batch size), so g_t moves the final θ_T by
    −lr · g_t · Σ_{k<T−t} μ^k = −w_t·B·g_t: momentum spreads each gradient over all later steps and
    c_i is sample i's exact share of θ_T − θ_0 (Σ_i c_i = θ_T − θ_0 on the kept elements). Report 004
    stores raw gradients and notes it is then not optimiser-aware; w_t makes it so for SGD+momentum.
    The per-sample gradients are taken at θ_t in `before_step` (torch.func vmap(grad(...)))."""

    def __init__(self, problem: Problem):
        recipe = problem.recipe
        if recipe.private:
            raise BaselineError("amnesiac_sample records the non-DP original only.")
        self.names, self.kept = kept_elements(problem, problem.config.baselines.amnesiac_fraction)
        self.contributions = torch.zeros(len(problem.y), len(self.kept))
        self.order = problem.train_order
        self.lr, self.momentum, self.batch_size = recipe.lr, recipe.momentum, recipe.batch_size
        self.steps = sum(stage.steps for stage in recipe.stages)
        self.step = 0

    def weight(self, step: int) -> float:
        """w_t: the factor by which a per-sample gradient at step t reaches θ_T."""
        remaining = self.steps - step
        spread = remaining if self.momentum == 0 else (1 - self.momentum ** remaining) / (1 - self.momentum)
        return self.lr / self.batch_size * spread

    def before_step(self, stage, positions, x, y, module, names, params) -> None:
        if list(names) != self.names:
            raise BaselineError("amnesiac_sample: the trained parameters differ from the plan's.")
        if len(positions):
            ids = torch.from_numpy(self.order[positions.cpu().numpy()])
            self.contributions.index_add_(0, ids, per_sample_grads(module, x, y, self.kept), alpha=-self.weight(self.step))
        self.step += 1

    def after_step(self, stage, names, params) -> None:
        pass

    def record(self) -> dict:
        return {"names": self.names, "kept": self.kept, "contributions": self.contributions}


class _Amnesiac(Method):
    """Shared unlearning: copy the original, subtract the recorded changes, short retain finetune."""

    family = "approximate"

    def undo(self, model: Classifier, problem: Problem, record: dict) -> dict[str, Any]:
        raise NotImplementedError

    def unlearn(self, problem: Problem, seed: int, record: Any | None = None) -> Outcome:
        record = _require(record, self.name)
        epochs = problem.config.baselines.amnesiac_finetune_epochs
        start = time.perf_counter()
        model = problem.original_copy()
        details = self.undo(model, problem, record)
        model = retain_finetune(model, problem, seed, epochs)
        seconds = time.perf_counter() - start
        return Outcome([model], seconds, tensor_bytes(record), {**details, "finetune_epochs": epochs})


@register
class AmnesiacBatch(_Amnesiac):
    name = "amnesiac_batch"
    description = "Graves et al. 2021: subtract the stored updates of every batch that held a forget id, then a short retain finetune"

    def recorder(self, problem: Problem) -> Recorder:
        return BatchRecorder(problem)

    def undo(self, model: Classifier, problem: Problem, record: dict) -> dict[str, Any]:
        touched = [t for t, ids in enumerate(record["ids"]) if np.isin(ids, problem.forget_ids).any()]
        subtract(model, record["names"], record["updates"][touched].double().sum(0))
        share = len(touched) / len(record["ids"])
        return {"batches_total": len(record["ids"]), "batches_touched": len(touched), "batches_touched_share": share,
                "note": (f"{share:.0%} of the batches held a forget id and were undone: a high share means most of "
                         "training is subtracted, so the method degenerates into near-retraining from the pretrained "
                         "model with only the short retain finetune.")}


@register
class AmnesiacSample(_Amnesiac):
    name = "amnesiac_sample"
    description = ("report 004: subtract each forget id's stored contribution on a random p-share of the parameters, "
                   "then a short retain finetune")

    def recorder(self, problem: Problem) -> Recorder:
        return SampleRecorder(problem)

    def undo(self, model: Classifier, problem: Problem, record: dict) -> dict[str, Any]:
        kept, named = record["kept"], dict(model.named_parameters())
        subtract(model, record["names"], record["contributions"][torch.as_tensor(np.array(problem.forget_ids))].double().sum(0), kept)
        return {"kept_elements": len(kept), "kept_fraction": len(kept) / sum(named[n].numel() for n in record["names"]),
                "samples_undone": len(problem.forget_ids),
                "note": ("per sample, the total change its gradients made to the kept parameter elements "
                         "(momentum-weighted, lr/B scaled) is subtracted; the other elements keep the forget ids' influence "
                         "until the retain finetune.")}
