"""The field's strongest published approximate baselines: NegGrad+ (Kurmanji et al., "Towards Unbounded
Machine Unlearning", NeurIPS 2023, the SCRUB paper) and SalUn (Fan et al., "SalUn: Empowering Machine
Unlearning via Gradient-based Weight Saliency in Both Image Classification and Generation", ICLR 2024).

Both edit a copy of the original with `base.sgd` and seeded batch orders (`reversal.Session`) and store
nothing for unlearning (storage 0).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from pipeline.baselines.base import batches, register
from pipeline.baselines.session import Approximate, Session, step


@register
class NegGradPlus(Approximate):
    """NegGrad+ (Kurmanji et al. 2023): for `neggrad_plus_epochs` epochs, each retain batch r is paired with a
    forget batch f (the forget set cycled) and one SGD step minimises α · CE(r) − (1 − α) · CE(f), with
    α = `neggrad_plus_alpha`; all layers, constant learning rate."""

    name = "neggrad_plus"
    description = "NegGrad+: joint α·CE(retain) − (1−α)·CE(forget) steps (Kurmanji et al. 2023)"

    def run(self, s: Session) -> dict[str, Any]:
        alpha, epochs = s.config.neggrad_plus_alpha, s.config.neggrad_plus_epochs
        optimizer = s.optimizer()
        for _ in range(epochs):
            for r, f in s.pairs():
                step(optimizer, alpha * s.loss(s.retain, r) - (1 - alpha) * s.loss(s.forget, f))
        return dict(epochs=epochs, alpha=alpha)


def saliency_mask(s: Session, fraction: float) -> list[torch.Tensor]:
    """SalUn's weight saliency at the original: |∂ mean CE(forget set) / ∂θ| over every parameter, and one global
    threshold keeping exactly ceil(fraction · #weights) of the largest (ties broken by `topk`)."""
    model = s.model
    model.zero_grad()
    n = len(s.forget[1])
    for idx in batches(n, s.config.batch_size, s.generator):
        (s.loss(s.forget, idx) * len(idx) / n).backward()
    params = list(model.parameters())
    scores = torch.cat([p.grad.abs().flatten() if p.grad is not None else torch.zeros(p.numel()) for p in params])
    model.zero_grad()
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[torch.topk(scores, min(scores.numel(), math.ceil(fraction * scores.numel()))).indices] = True
    return [m.view_as(p) for m, p in zip(keep.split([p.numel() for p in params]), params)]


def wrong_labels(y: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random label different from each true label (SalUn's random labelling, never the true class)."""
    return (y + torch.randint(1, num_classes, y.shape, generator=generator)) % num_classes


@register
class SalUn(Approximate):
    """SalUn (Fan et al. 2024), random-label variant:

    1. mask m: the `salun_saliency` share of weights with the largest |gradient of the forget loss| at the
       original, one global threshold (`saliency_mask`);
    2. the forget samples get random wrong labels (drawn once, seeded) and join the retain set; for `salun_epochs`
       epochs SGD steps on shuffled mini-batches of that union update only the salient weights: after each
       step every weight outside m is reset to its original value (SalUn masks the gradient; resetting also
       cancels the weight decay that would otherwise move unmasked weights).
    """

    name = "salun"
    description = "SalUn: random wrong labels on the forget set, only forget-salient weights trained (Fan et al. 2024)"

    def run(self, s: Session) -> dict[str, Any]:
        masks = saliency_mask(s, s.config.salun_saliency)
        params = list(s.model.parameters())
        frozen = [p.detach().clone() for p in params]
        relabelled = wrong_labels(s.forget[1], s.problem.num_classes, s.generator)
        union = (torch.cat([s.retain[0], s.forget[0]]), torch.cat([s.retain[1], relabelled]))
        optimizer = s.optimizer()
        for _ in range(s.config.salun_epochs):
            for idx in batches(len(union[1]), s.config.batch_size, s.generator):
                step(optimizer, s.loss(union, idx))
                with torch.no_grad():
                    for p, m, p0 in zip(params, masks, frozen):
                        p.copy_(torch.where(m, p, p0))
        salient = sum(int(m.sum()) for m in masks)
        return dict(epochs=s.config.salun_epochs, salient_weights=salient, weights=sum(p.numel() for p in params))
