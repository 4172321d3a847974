"""DeltaGrad (Wu, Dobriban & Davidson, "DeltaGrad: Rapid retraining of machine learning models",
ICML 2020) on the `fc` strategy's head, with its own training (not the shared original).

The head is an L2-regularised softmax regression on the public model's frozen features φ_i:
F_S(θ) = (1/|S|) Σ_{i∈S} CE(Wφ_i + b, y_i) + (λ/2)‖θ‖², θ = [W | b] (λ on W and b: strongly
convex). Training is full-batch GD θ_{t+1} = θ_t − η∇F(θ_t) for T iterations from the public
model's head, caching θ_t and ∇F(θ_t) (float64). DeltaGrad replays GD on the changed set: exact
gradients for t < j0 and every T0-th iteration after (these also give the L-BFGS pairs
(θ^I_t − θ_t, ∇F(θ^I_t) − ∇F(θ_t)), last m kept); otherwise ∇F(θ^I_t) ≈ ∇F(θ_t) + B_t(θ^I_t − θ_t)
and only the changed samples' gradients are computed:
    delete F: ∇F_R(θ^I) = [n ∇F(θ^I) − Σ_{i∈F} ∇f_i(θ^I)] / (n − r),
    add F:    ∇F_{R∪F}(θ^I) = [(n−r) ∇F_R(θ^I) + Σ_{i∈F} ∇f_i(θ^I)] / n,
with f_i = CE_i + (λ/2)‖θ‖². The oracle is the same GD on the target set (exact retrain of the head).

Gradient evaluations are counted in per-sample gradient units (one ∇CE_i(θ), all classes):
an exact DeltaGrad iteration costs n (retain and forget gradients, both needed for the pair), an
approximate one r; exact GD on a set S costs |S| per iteration. L-BFGS products (O(m·D)) are not counted.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.baselines.base import Method, Outcome, Problem, register
from pipeline.core.models import Classifier
from pipeline.core.train import FEATURE_CHUNK


@dataclass
class Head:
    """The softmax regression on cached features; counts per-sample gradient evaluations."""

    phi: torch.Tensor  # [n, d] float64 features of every private id (row = id)
    y: torch.Tensor  # [n] int64
    classes: int
    l2: float
    evaluations: int = 0

    def gradient_sum(self, theta: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Σ_{i∈ids} ∇CE_i(θ), flat like θ ([C, d+1] row-major); costs |ids| evaluations."""
        self.evaluations += len(ids)
        w = theta.view(self.classes, -1)
        phi = self.phi[ids]
        residual = torch.softmax(phi @ w[:, :-1].T + w[:, -1], dim=1) - F.one_hot(self.y[ids], self.classes)
        return torch.cat([residual.T @ phi, residual.sum(0)[:, None]], 1).reshape(-1)

    def gradient(self, theta: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """∇F_S(θ) for S = ids."""
        return self.gradient_sum(theta, ids) / len(ids) + self.l2 * theta

    def descend(self, theta: torch.Tensor, ids: torch.Tensor, iterations: int, lr: float) -> tuple[torch.Tensor, dict]:
        """Exact full-batch GD on `ids`; returns θ_T and the cached history {θ_t, ∇F(θ_t)}, t < T."""
        thetas, grads = [], []
        for _ in range(iterations):
            g = self.gradient(theta, ids)
            thetas.append(theta)
            grads.append(g)
            theta = theta - lr * g
        return theta, {"theta": torch.stack(thetas), "grad": torch.stack(grads)}


def lbfgs_product(s: list[torch.Tensor], y: list[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
    """B v for the L-BFGS Hessian approximation from pairs (s_k, y_k), oldest first, in the compact
    form of Byrd, Nocedal & Schnabel (1994), as DeltaGrad's Algorithm 3: B0 = σI with
    σ = y_m·s_m / s_m·s_m (newest pair), B = B0 − [B0 S, Y] [[S'B0 S, L], [L', −D]]^{-1} [S'B0; Y'] with
    D = diag(s_k·y_k) and L the strictly lower triangle of S'Y."""
    S, Y = torch.stack(s, 1), torch.stack(y, 1)
    sigma = (S[:, -1] @ Y[:, -1]) / (S[:, -1] @ S[:, -1])
    sy = S.T @ Y
    lower = torch.tril(sy, -1)
    middle = torch.cat([torch.cat([sigma * S.T @ S, lower], 1), torch.cat([lower.T, -torch.diag(torch.diag(sy))], 1)], 0)
    coef = torch.linalg.solve(middle, torch.cat([sigma * S.T @ v, Y.T @ v]))
    return sigma * v - torch.cat([sigma * S, Y], 1) @ coef


def deltagrad(head: Head, history: dict, common: torch.Tensor, changed: torch.Tensor, add: bool, lr: float,
              period: int, burn_in: int, memory: int) -> torch.Tensor:
    """DeltaGrad's replay of the cached GD run on A (= common ∪ changed when deleting, common when
    adding) for the target set (common, or common ∪ changed when adding)."""
    sign = 1.0 if add else -1.0
    n_a = len(common) + (0 if add else len(changed))
    n_target = n_a + int(sign) * len(changed)
    theta = history["theta"][0].clone()
    pairs_s: list[torch.Tensor] = []
    pairs_y: list[torch.Tensor] = []
    for t, (theta_t, grad_t) in enumerate(zip(history["theta"], history["grad"])):
        changed_sum = head.gradient_sum(theta, changed)
        if t < burn_in or (t - burn_in) % period == 0 or not pairs_s:
            common_sum = head.gradient_sum(theta, common)
            grad_a = (common_sum + (0 if add else changed_sum)) / n_a + head.l2 * theta
            s, y = theta - theta_t, grad_a - grad_t
            if s @ y > 0:  # zero at t = 0 (θ^I_0 = θ_0); positive otherwise (strong convexity)
                pairs_s, pairs_y = (pairs_s + [s])[-memory:], (pairs_y + [y])[-memory:]
            target = (common_sum + (changed_sum if add else 0)) / n_target + head.l2 * theta
        else:
            grad_a = grad_t + lbfgs_product(pairs_s, pairs_y, theta - theta_t)
            target = (n_a * grad_a + sign * (changed_sum + len(changed) * head.l2 * theta)) / n_target
        theta = theta - lr * target
    return theta


@torch.no_grad()
def features(problem: Problem) -> torch.Tensor:
    """The public backbone's features of every private id (eval mode, fixed chunks), float64."""
    backbone = copy.deepcopy(problem.pretrained.features).eval()
    x = torch.from_numpy(np.ascontiguousarray(problem.x, np.float32))
    return torch.cat([backbone(x[i: i + FEATURE_CHUNK]) for i in range(0, len(x), FEATURE_CHUNK)]).double()


def classifier(problem: Problem, theta: torch.Tensor) -> Classifier:
    """The public model with its head replaced by θ (float32), in eval mode."""
    model = copy.deepcopy(problem.pretrained)
    w = theta.view(problem.num_classes, -1)
    with torch.no_grad():
        model.fc.weight.copy_(w[:, :-1].float())
        model.fc.bias.copy_(w[:, -1].float())
    return model.eval()


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


@register
class DeltaGrad(Method):
    name = "deltagrad"
    family = "approximate"
    description = ("Wu et al. 2020: the fc head as L2 softmax regression trained by full-batch GD with a cached history; "
                   "deletion replays GD with L-BFGS-approximated gradients (oracle: exact GD retrain of the head)")

    def unlearn(self, problem: Problem, seed: int, record=None) -> Outcome:
        """Deterministic (full-batch GD): `seed` is unused."""
        b = problem.config.baselines
        head = Head(features(problem), torch.from_numpy(np.asarray(problem.y, np.int64)), problem.num_classes, b.deltagrad_l2)
        forget = torch.as_tensor(np.array(problem.forget_ids))
        retain = torch.from_numpy(np.setdiff1d(np.arange(len(problem.y)), problem.forget_ids))
        start = torch.cat([problem.pretrained.fc.weight.detach(), problem.pretrained.fc.bias.detach()[:, None]], 1)
        start = start.double().reshape(-1)
        steps, lr = b.deltagrad_iterations, b.deltagrad_lr
        replay = dict(lr=lr, period=b.deltagrad_period, burn_in=b.deltagrad_burn_in, memory=b.deltagrad_history)

        (full, full_history), full_seconds = _timed(head.descend, start, torch.cat([retain, forget]), steps, lr)
        head.evaluations = 0
        (exact, retain_history), exact_seconds = _timed(head.descend, start, retain, steps, lr)
        facts = {}
        for direction, history, base, oracle, oracle_seconds in (("delete", full_history, full, exact, exact_seconds),
                                                                 ("add", retain_history, exact, full, full_seconds)):
            head.evaluations = 0
            approx, seconds = _timed(deltagrad, head, history, retain, forget, direction == "add", **replay)
            exact_evaluations = steps * (len(retain) + (len(forget) if direction == "add" else 0))
            facts[direction] = {
                "model": approx, "seconds": seconds,
                "l2_to_exact": float((approx - oracle).norm()), "l2_original_to_exact": float((base - oracle).norm()),
                "speedup_vs_exact": oracle_seconds / seconds, "seconds_exact": oracle_seconds,
                "gradient_evaluations": head.evaluations, "gradient_evaluations_exact": exact_evaluations,
                "gradient_evaluations_saved": exact_evaluations - head.evaluations,
                "storage_bytes": sum(t.numel() * t.element_size() for t in history.values()),
            }
        delete, add = facts["delete"], facts["add"]
        add.pop("model")
        details = {k: v for k, v in delete.items() if k not in ("model", "seconds", "storage_bytes")}
        details.update(add={k: v for k, v in add.items()}, iterations=steps, forget=len(forget), samples=len(problem.y),
                       init="public model's head", gradient_unit="one sample's cross-entropy gradient (all classes)",
                       add_note="add: DeltaGrad replays the retain-set run's history adding the forget ids back; its exact "
                                "reference is the head trained on all ids (the original), its 'original' the retain-trained head")
        return Outcome([classifier(problem, delete["model"])], delete["seconds"], delete["storage_bytes"], details,
                       oracle=[classifier(problem, exact)], oracle_name="retrain_head", oracle_seconds=exact_seconds,
                       original=[classifier(problem, full)])
