"""Influence distillation (report 002, seeds/002, "Influence distillation for approximate unlearning"): a
student is distilled offline from the original (the teacher) by logit matching on the retain set, with a
penalty on the forget set that uses "the negative of the loss on the teacher model as the influence" instead
of Hessian-based influence functions (too costly).
"""
from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.baselines.base import Problem, register
from pipeline.baselines.session import Approximate, Session, cosine, step
from pipeline.core.models import Classifier, build


def soft_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), batch mean (Hinton et al. 2015's logit matching; T²
    keeps the gradient scale independent of T)."""
    return F.kl_div(F.log_softmax(student / temperature, 1), F.log_softmax(teacher / temperature, 1),
                    reduction="batchmean", log_target=True) * temperature ** 2


def logits(model: torch.nn.Module, x: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """`model(x)` without gradients, `chunk` rows at a time (the teacher's logits on a whole set, bounded memory)."""
    with torch.no_grad():
        return torch.cat([model(x[i: i + chunk]) for i in range(0, len(x), chunk)])


def student(problem: Problem, width: int | None, seed: int) -> Classifier:
    """The student and where it starts. Same width as the teacher: a copy of the public model `pretrained` (the
    teacher's own starting point, which never saw a private sample, so the student owes the private data only
    to distillation). Another width: the same architecture built from scratch with `seed`."""
    teacher_width = problem.config.model.width
    if width is None or width == teacher_width:
        model = copy.deepcopy(problem.pretrained)
        for p in model.parameters():
            p.requires_grad_(True)
        return model.train()
    shape = tuple(problem.x.shape[1:])
    return build(problem.config.model.name, shape, problem.num_classes, width, seed).train()


@register
class Distill(Approximate):
    """Influence distillation (report 002). The objective, summed over samples and normalised by the retain size:

        L = (1/|R|) · [ sum over x in R of KL_T(x)  −  w · sum over x in F of KL_T(x) ]

    with KL_T(x) = T² · KL(softmax(teacher(x)/T) ‖ softmax(student(x)/T)), R / F the retain / forget sets,
    T = `distill_temperature`, w = `distill_forget_weight`, teacher = the original (fixed, logits computed once).
    For `distill_epochs` epochs (SGD, cosine schedule, all layers) each retain batch r is paired with a forget
    batch f (the forget set cycled) and one step minimises the unbiased estimate

        mean over r of KL_T  −  w · (|F|/|R|) · mean over f of KL_T,

    so w = 1 means each forget sample pushes away as hard as each retain sample pulls. The first term is the
    report's offline logit-matching distillation on retain data; the second is its influence penalty, read as
    "the negative of the loss with respect to the teacher" on the forget set: the distillation loss with its
    sign flipped, pushing the student away from the teacher's outputs on forget samples. The report's wording
    admits another reading (weighting by the teacher's own negative loss, which has no gradient in the student);
    this one is ours, and so is the |F|/|R| normalisation (unnormalised, w = 1 on 20 of 1,000 digits collapsed
    the student). The ascent term is unbounded: a large w or many epochs can still collapse forget outputs.
    """

    name = "distill"
    description = "influence distillation: retain logit matching minus forget logit matching (report 002)"

    def session(self, problem: Problem, seed: int) -> Session:
        start = time.perf_counter()  # building the student is part of the unlearning time
        torch.manual_seed(seed)
        return Session.open(problem, seed, student(problem, problem.config.baselines.distill_width, seed), start)

    def run(self, s: Session) -> dict[str, Any]:
        b, model, teacher = s.config, s.model, s.problem.original
        t_retain, t_forget = logits(teacher, s.retain[0]), logits(teacher, s.forget[0])
        temperature, weight = b.distill_temperature, b.distill_forget_weight
        share = len(s.forget[1]) / len(s.retain[1])  # |F| / |R|: both terms are sums over samples
        optimizer = s.optimizer(lr=b.distill_lr)  # a fresh student needs more than the edits' lr 0.001
        schedule = cosine(optimizer, b.distill_epochs)
        for _ in range(b.distill_epochs):
            for r, f in s.pairs():
                loss = soft_kl(model(s.retain[0][r]), t_retain[r], temperature)
                if weight:
                    loss = loss - weight * share * soft_kl(model(s.forget[0][f]), t_forget[f], temperature)
                step(optimizer, loss)
            schedule.step()
        width = b.distill_width or s.problem.config.model.width
        return dict(epochs=b.distill_epochs, temperature=temperature, forget_weight=weight, width=width,
                    init="pretrained" if width == s.problem.config.model.width else "scratch")
