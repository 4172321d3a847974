"""Finetuning strategies: which parameters (and which elements of them) train on private data.

A plan names the trainable parameters and, for `fc_gn_conv`, a 0/1 mask per conv weight that
keeps the largest-|w| fraction of the *pretrained* weights. Masked elements must never change:
the training loop masks per-sample gradients before clipping and the noised update after.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.core.models import Classifier
from pipeline.errors import UserError


class FinetuneError(UserError, ValueError):
    """The strategy does not fit the model (e.g. conv finetuning on a model without convs)."""


@dataclass
class FinetunePlan:
    strategy: str
    trainable: list[str]  # parameter names, in model order
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # name → bool mask (same shape)

    @property
    def head_only(self) -> bool:
        """Only the linear head trains: the frozen backbone's features can be cached."""
        return self.strategy == "fc"


def _names(model: Classifier, keep: Callable[[str, nn.Module], bool]) -> list[str]:
    names = []
    for module_name, module in model.named_modules():
        if keep(module_name, module):
            names += [f"{module_name}.{p}" if module_name else p for p, _ in module.named_parameters(recurse=False)]
    return names


def _is_head(name: str, module: nn.Module) -> bool:
    return name == "fc"


def _is_head_or_norm(name: str, module: nn.Module) -> bool:
    return _is_head(name, module) or isinstance(module, nn.GroupNorm)


def _top_magnitude_masks(model: Classifier, fraction: float) -> dict[str, torch.Tensor]:
    """Largest-|w| `fraction` of all conv weights together (one global threshold, ties kept)."""
    convs = {f"{n}.weight": m.weight.detach() for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if not convs:
        raise FinetuneError("finetune.strategy=fc_gn_conv needs a model with conv layers; use gn_cnn or resnet18_gn.")
    magnitudes = torch.cat([w.abs().flatten() for w in convs.values()])
    k = max(1, int(round(fraction * magnitudes.numel())))
    threshold = torch.topk(magnitudes, k).values.min()
    return {name: w.abs() >= threshold for name, w in convs.items()}


# The finetuning strategies by name: `finetune.strategy` (and `baselines.dp_strategy`) choose one;
# config validation offers exactly these names (tests/unit/test_config.py checks that it does).
STRATEGIES: dict[str, Callable[[Classifier, float], FinetunePlan]] = {}


def strategy(name: str) -> Callable[[Callable[[Classifier, float], FinetunePlan]], Callable[[Classifier, float], FinetunePlan]]:
    """Register a strategy: a function (model, conv_fraction) → the plan it trains."""
    def register(build: Callable[[Classifier, float], FinetunePlan]) -> Callable[[Classifier, float], FinetunePlan]:
        STRATEGIES[name] = build
        return build
    return register


@strategy("full")
def _full(model: Classifier, conv_fraction: float) -> FinetunePlan:
    return FinetunePlan("full", [n for n, _ in model.named_parameters()])


@strategy("fc")
def _head(model: Classifier, conv_fraction: float) -> FinetunePlan:
    return FinetunePlan("fc", _names(model, _is_head))


@strategy("fc_gn")
def _head_and_norms(model: Classifier, conv_fraction: float) -> FinetunePlan:
    return FinetunePlan("fc_gn", _names(model, _is_head_or_norm))


@strategy("fc_gn_conv")
def _head_norms_and_top_convs(model: Classifier, conv_fraction: float) -> FinetunePlan:
    masks = _top_magnitude_masks(model, conv_fraction)
    names = set(_names(model, _is_head_or_norm)) | set(masks)
    ordered = [n for n, _ in model.named_parameters() if n in names]
    return FinetunePlan("fc_gn_conv", ordered, masks)


def plan_for(model: Classifier, strategy: str, conv_fraction: float = 0.05) -> FinetunePlan:
    """The parameters `strategy` trains on `model` (masks computed from its current weights)."""
    if strategy not in STRATEGIES:
        raise FinetuneError(f"finetune.strategy '{strategy}' unknown; choose one of {', '.join(STRATEGIES)}.")
    return STRATEGIES[strategy](model, conv_fraction)


def apply_plan(model: nn.Module, plan: FinetunePlan, prefix: str = "") -> list[nn.Parameter]:
    """Freeze everything the plan does not train; return the trainable parameters in order."""
    trainable = set(plan.trainable)
    params = []
    for name, param in model.named_parameters():
        full = prefix + name
        param.requires_grad_(full in trainable)
        if full in trainable:
            params.append(param)
    return params
