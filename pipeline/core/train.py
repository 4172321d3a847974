"""SISA slice-stage training in plain torch + Opacus (no Ray).

Stage j trains on slices 0..j, starting from the state after stage j-1 (trainable parameters
and momentum buffers). Every stage draws its Poisson batches and its DP noise from generators
seeded by (seed, shard, stage) alone, and its sample rate, step count and σ come from the
stored recipe — so replaying stages k.. after a deletion equals training from scratch without
the deleted ids, bit for bit on CPU.

With privacy unit "subject" (`recipe.unit`) a step Poisson-samples *subjects* (each sample's
owner is given alongside x and y; subjects are numbered by first appearance in the stage's
inputs, so the draw depends only on the stage's data), takes all their samples, sums each
subject's per-sample gradients (Opacus' `grad_sample`, `index_add_` in position order) and hands
those per-subject sums to the DP optimizer, which clips each to C and adds the noise: one
person's contribution to a step is at most C, whatever the number of samples they own.
"""
from __future__ import annotations

import copy
import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.augment import augment
from pipeline.core.finetune import FinetunePlan, apply_plan
from pipeline.core.models import Classifier
from pipeline.core.privacy import Recipe

FEATURE_CHUNK = 512
# Opacus hooks the first trainable layer; when nothing below it trains, torch notes that its
# input needs no gradient. Expected with frozen backbones, and harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


@dataclass
class ShardState:
    """What a checkpoint carries between stages: trainable parameters, momentum buffers and, with
    `finetune.ema`, the moving average of the trainable parameters (what the shard serves)."""

    params: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)
    ema: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def served(self) -> dict[str, torch.Tensor]:
        """The parameters predictions use: the EMA weights when kept, else the trained ones."""
        return self.ema or self.params

    def payload(self) -> dict:
        """Checkpoint fields (the `ema` entry only when kept: checkpoints without it stay byte-identical)."""
        return {"params": self.params, "momentum": self.momentum, **({"ema": self.ema} if self.ema else {})}

    @classmethod
    def from_payload(cls, payload: dict) -> ShardState:
        return cls(payload["params"], payload["momentum"], payload.get("ema", {}))


class StepHook(Protocol):
    """Observes every SGD step of a stage (training-time records of unlearning baselines).

    `positions` index the stage's cumulative inputs (slices 0..stage in ledger order); `params`
    are the trainable parameters (`names` in model order), at θ_t in `before_step` and at θ_t+1
    in `after_step`. A hook must not touch the seeded generators or the parameters."""

    def before_step(self, stage: int, positions: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    module: nn.Module, names: list[str], params: list[nn.Parameter]) -> None: ...

    def after_step(self, stage: int, names: list[str], params: list[nn.Parameter]) -> None: ...


class GradientInjection(Protocol):
    """Adds units that are gradients, not data, to every step, and observes the step's update (the
    white-box audit's canaries, `pipeline/evaluation/gradient_canaries.py`). With DP, `add` finds the
    step's per-unit gradients (data samples or subjects) in `p.grad_sample`, may append rows to it (then
    clipped and noised like any unit) and may record what it needs of the data's; without DP it finds the
    summed data gradient divided by the batch size in `p.grad`. `observe` sees `p.grad` after the noise,
    still divided by `batch_size`. Neither may touch the seeded generators."""

    def add(self, stage: int, sample_rate: float, names: list[str], params: list[nn.Parameter], private: bool,
            max_grad_norm: float, batch_size: int) -> None: ...

    def observe(self, names: list[str], params: list[nn.Parameter], batch_size: int) -> None: ...


def stage_seed(seed: int, shard: int, stage: int, purpose: str) -> int:
    """A 63-bit seed that depends only on (run seed, shard, stage, purpose)."""
    blob = f"{seed}/{shard}/{stage}/{purpose}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") >> 1


def with_params(pretrained: Classifier, params: dict[str, torch.Tensor]) -> Classifier:
    """A copy of `pretrained` with the trained `params` loaded (a shard's constituent model), in eval mode."""
    model = copy.deepcopy(pretrained)
    model.load_state_dict({**model.state_dict(), **params})
    return model.eval()


def draw_purpose(purpose: str, draw: int) -> str:
    """The seed purpose of a stage's `draw`: draw 0 (the original training) keeps the plain
    purpose, so runs trained before fresh draws existed replay and verify unchanged."""
    return purpose if draw == 0 else f"{purpose}/draw{draw}"


def ids_digest(ids: np.ndarray) -> str:
    """Content hash of a set of sample ids (order-free): what a checkpoint saw."""
    return hashlib.sha256(np.sort(np.asarray(ids, np.int64)).tobytes()).hexdigest()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def initial_state(model: Classifier, plan: FinetunePlan) -> ShardState:
    named = dict(model.named_parameters())
    return ShardState({n: named[n].detach().clone() for n in plan.trainable})


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Softmax outputs, batched; the model is put in eval mode. Small batches keep a conv net's
    activations in cache: on one CPU thread, gn_cnn on 10,000 images takes 2.2 s in batches of 128
    and 6.3 s in batches of 1,024."""
    model.eval()
    return torch.cat([F.softmax(model(x[i: i + batch_size]), dim=1) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Raw class scores (pre-softmax logits), batched like `predict_proba`, returned as float64: what
    LiRA's φ is computed from (`unlearning.logit_confidence_from_logits`), since float32 softmax
    outputs round to 1 and saturate φ at ≈16.6 for memorised examples."""
    model.eval()
    return torch.cat([model(x[i: i + batch_size]) for i in range(0, len(x), batch_size)]).double()


class ShardTrainer:
    """Trains one shard's constituent model stage by stage from a pretrained model.

    Recipe levers (`finetune.*`, off by default): `ema` keeps an exponential moving average of the
    trainable parameters (decay min(ema, (1+t)/(10+t)) at global step t; post-processing, no ε cost)
    that the shard serves; `augmult` = K draws K augmented copies of every sampled image and averages
    their gradients into its per-sample gradient before clipping (sensitivity stays C), the draws
    seeded by (seed, shard, stage, draw, step)."""

    def __init__(self, pretrained: Classifier, plan: FinetunePlan, recipe: Recipe, seed: int, shard: int,
                 device: torch.device | str = "cpu", ema: float | None = None, augmult: int = 0):
        self.device = torch.device(device)
        self.pretrained = copy.deepcopy(pretrained).to(self.device)
        self.plan, self.recipe, self.seed, self.shard = plan, recipe, seed, shard
        self.ema, self.augmult = ema, augmult
        if augmult and plan.head_only:
            raise ValueError("augmentation multiplicity needs images; head-only finetuning trains on cached features")
        self.masks = {n: m.to(self.device) for n, m in plan.masks.items()}
        self.last_loss: float | None = None  # mean per-sample training loss of the latest stage (progress only)

    # -- inputs -------------------------------------------------------------------------------
    @torch.no_grad()
    def slice_inputs(self, x: np.ndarray) -> torch.Tensor:
        """Images of one slice on the device, or — for head-only finetuning — the frozen
        backbone's features, computed once per slice in fixed chunks (deterministic)."""
        images = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        if not self.plan.head_only:
            return images
        backbone = self.pretrained.features.eval()
        return torch.cat([backbone(images[i: i + FEATURE_CHUNK]) for i in range(0, len(images), FEATURE_CHUNK)])

    # -- training -----------------------------------------------------------------------------
    def _module(self, state: ShardState) -> tuple[nn.Module, list[nn.Parameter], list[str], str]:
        model = copy.deepcopy(self.pretrained)
        model.load_state_dict({**model.state_dict(), **state.params})
        model.train()
        if self.plan.head_only:
            module, prefix = model.fc, "fc."
        else:
            module, prefix = model, ""
        params = apply_plan(module, self.plan, prefix)
        names = [prefix + n for n, p in module.named_parameters() if p.requires_grad]
        return module, params, names, prefix

    def run_stage(self, state: ShardState, x: torch.Tensor, y: torch.Tensor, stage_index: int,
                  hook: StepHook | None = None, draw: int = 0, owners: torch.Tensor | None = None,
                  inject: GradientInjection | None = None) -> ShardState:
        """One slice stage on the cumulative inputs `x`, `y` (slices 0..stage_index). `draw` picks
        the stage's randomness (Poisson sampling and DP noise): 0 for the original training, the
        release number for a replay, so every release draws fresh noise (see `draw_purpose`).
        With unit "subject", `owners[i]` is the subject number (0..m-1, see `subject_numbers`) of `x[i]`.
        `inject` adds gradient units to every step and observes its update (white-box audits only)."""
        recipe, stage = self.recipe, self.recipe.stages[stage_index]
        by_subject = recipe.unit == "subject"
        if by_subject:
            if owners is None or len(owners) != len(x):
                raise ValueError("privacy unit 'subject' needs the subject of every training sample")
            owners = owners.to(self.device)
            people = int(owners.max()) + 1 if len(owners) else 0
        module, params, names, prefix = self._module(state)
        sgd = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum)
        for name, p in zip(names, params):
            if name in state.momentum:
                sgd.state[p]["momentum_buffer"] = state.momentum[name].clone().to(self.device)
        sampler = torch.Generator().manual_seed(stage_seed(self.seed, self.shard, stage_index, draw_purpose("sample", draw)))
        if recipe.private:
            from opacus import GradSampleModule  # here: a shard actor that only predicts never loads Opacus (~1.5 s)
            from opacus.optimizers import DPOptimizer

            noise = torch.Generator(device=self.device).manual_seed(
                stage_seed(self.seed, self.shard, stage_index, draw_purpose("noise", draw)))
            module = GradSampleModule(module, batch_first=True, loss_reduction="sum")
            optimizer = DPOptimizer(sgd, noise_multiplier=recipe.noise_multiplier, max_grad_norm=recipe.max_grad_norm,
                                    expected_batch_size=recipe.batch_size, loss_reduction="mean", generator=noise)
        masks = [self.masks.get(n) for n in names]
        ema = self._ema_start(state, names, params)
        first_step = sum(s.steps for s in recipe.stages[:stage_index])  # the EMA's global step count
        k = max(1, self.augmult)
        loss_sum, loss_count = torch.zeros((), device=self.device), 0
        for step in range(stage.steps):
            if by_subject:  # Poisson over subjects; a chosen subject brings all its samples (in position order)
                picked = (torch.rand(people, generator=sampler) < stage.sample_rate).to(self.device)
                chosen = picked[owners].nonzero().squeeze(1)
                rows = (picked.cumsum(0) - 1)[owners[chosen]]  # each chosen sample's row among the chosen subjects
            else:
                chosen = (torch.rand(len(x), generator=sampler) < stage.sample_rate).nonzero().squeeze(1).to(self.device)
            if hook is not None:
                hook.before_step(stage_index, chosen, x[chosen], y[chosen], module, names, params)
            inputs, targets = self._augmented(x[chosen], y[chosen], stage_index, draw, step)
            loss = F.cross_entropy(module(inputs), targets, reduction="sum")
            loss_sum, loss_count = loss_sum + loss.detach() / k, loss_count + len(chosen)
            if recipe.private:
                loss.backward()
                if self.augmult:  # a sample's K draws are rows i*K..i*K+K-1: their mean is its gradient
                    for p in params:
                        p.grad_sample = p.grad_sample.view(len(chosen), k, *p.grad_sample.shape[1:]).mean(1)
                for p, mask in zip(params, masks):
                    if mask is not None:
                        p.grad_sample = p.grad_sample * mask  # masked elements never reach clipping
                if by_subject:  # clip per subject: Opacus clips whatever rows grad_sample has
                    for p in params:
                        p.grad_sample = per_subject_sum(p.grad_sample, rows, int(picked.sum()))
                if inject is not None:
                    inject.add(stage_index, stage.sample_rate, names, params, True, recipe.max_grad_norm, recipe.batch_size)
                if optimizer.pre_step():  # clip, add noise, average over the expected batch
                    _mask_grads(params, masks)
                    if inject is not None:
                        inject.observe(names, params, recipe.batch_size)
                    sgd.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                (loss / (k * recipe.batch_size)).backward()
                if inject is not None:
                    inject.add(stage_index, stage.sample_rate, names, params, False, recipe.max_grad_norm, recipe.batch_size)
                    inject.observe(names, params, recipe.batch_size)
                _mask_grads(params, masks)
                sgd.step()
                sgd.zero_grad(set_to_none=True)
            if ema is not None:
                _ema_update(ema, names, params, min(self.ema, (1 + first_step + step) / (10 + first_step + step)))
            if hook is not None:
                hook.after_step(stage_index, names, params)
        if recipe.private:
            module = module.to_standard_module()
        self.last_loss = float(loss_sum) / loss_count if loss_count else None
        return ShardState(
            {n: p.detach().cpu().clone() for n, p in zip(names, params)},
            {n: sgd.state[p]["momentum_buffer"].detach().cpu().clone()
             for n, p in zip(names, params) if "momentum_buffer" in sgd.state[p]},
            {n: t.cpu().clone() for n, t in ema.items()} if ema is not None else {},
        )

    def _ema_start(self, state: ShardState, names: list[str], params: list[nn.Parameter]) -> dict[str, torch.Tensor] | None:
        """The moving average entering this stage: the checkpoint's, or the stage's starting weights."""
        if self.ema is None:
            return None
        return {n: (state.ema[n].to(self.device) if n in state.ema else p.detach()).clone() for n, p in zip(names, params)}

    def _augmented(self, x: torch.Tensor, y: torch.Tensor, stage: int, draw: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`augmult` = K augmented copies of every image (copies of one image adjacent), seeded per
        (seed, shard, stage, draw, step); the batch unchanged when the lever is off."""
        if not self.augmult or len(x) == 0:
            return x, y
        gen = torch.Generator().manual_seed(stage_seed(self.seed, self.shard, stage, draw_purpose(f"augmult/step{step}", draw)))
        return augment(x.repeat_interleave(self.augmult, 0), gen), y.repeat_interleave(self.augmult)

    def train(self, slices: list[tuple[np.ndarray, np.ndarray]], start_stage: int = 0,
              state: ShardState | None = None,
              on_stage: Callable[[int, ShardState], None] | None = None, hook: StepHook | None = None,
              draws: list[int] | None = None, subjects: list[np.ndarray] | None = None,
              inject: GradientInjection | None = None) -> ShardState:
        """Train stages start_stage..R-1; `slices` holds (x, y) of every slice 0..R-1; `draws[j]`
        is stage j's randomness draw (default 0: the original training's); `subjects[j]` holds the
        subject (any hashable label) of each sample of slice j (needed with privacy unit "subject")."""
        state = state or initial_state(self.pretrained, self.plan)
        inputs = [self.slice_inputs(x) for x, _ in slices]
        labels = [torch.from_numpy(np.asarray(y, np.int64)).to(self.device) for _, y in slices]
        for j in range(start_stage, len(slices)):
            owners = None if subjects is None else torch.from_numpy(subject_numbers(np.concatenate(subjects[: j + 1])))
            state = self.run_stage(state, torch.cat(inputs[: j + 1]), torch.cat(labels[: j + 1]), j, hook,
                                   draws[j] if draws else 0, owners, inject)
            if on_stage is not None:
                on_stage(j, state)
        return state

    def model(self, state: ShardState) -> Classifier:
        """The constituent model for `state` (pretrained weights + the served parameters: EMA ones when kept)."""
        return with_params(self.pretrained, {n: t.to(self.device) for n, t in state.served.items()})


def subject_numbers(labels: np.ndarray) -> np.ndarray:
    """Subject labels → numbers 0..m-1 in order of first appearance (int64): a function of the
    stage's inputs alone, so a replay and a from-scratch retrain draw the same subjects."""
    _, first, inverse = np.unique(np.asarray(labels), return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def per_subject_sum(grad_sample: torch.Tensor, rows: torch.Tensor, subjects: int) -> torch.Tensor:
    """(n, ...) per-sample gradients → (subjects, ...) per-subject sums, row `rows[i]` collecting
    sample i (`index_add_`: sequential on CPU, deterministic on CUDA under deterministic algorithms)."""
    out = torch.zeros((subjects, *grad_sample.shape[1:]), dtype=grad_sample.dtype, device=grad_sample.device)
    return out.index_add_(0, rows, grad_sample)


def _mask_grads(params: list[nn.Parameter], masks: list[torch.Tensor | None]) -> None:
    """Zero the update of masked elements (DP noise included) so they stay bitwise equal."""
    for p, mask in zip(params, masks):
        if mask is not None and p.grad is not None:
            p.grad.mul_(mask)


@torch.no_grad()
def _ema_update(ema: dict[str, torch.Tensor], names: list[str], params: list[nn.Parameter], decay: float) -> None:
    for name, p in zip(names, params):
        ema[name].mul_(decay).add_(p.detach(), alpha=1 - decay)
