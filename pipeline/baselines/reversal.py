"""Report 003's unlearning by finetuning and gradient reversal (Dhinakaran 2024, "Efficient Machine Unlearning
for Deep Neural Networks", seeds/003): Models 1-6 and the final hybrid. Every method edits a copy of the original
with `base.sgd` (lr 0.001, momentum 0.9, weight decay 5e-4) and seeded batch orders, and stores nothing for
unlearning (storage 0). The shared machinery is in `session.py`."""
from __future__ import annotations

import math
from typing import Any

from pipeline.baselines.base import register
from pipeline.baselines.session import Approximate, Session, early_blocks, last_block, set_trainable


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
