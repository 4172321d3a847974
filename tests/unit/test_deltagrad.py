"""Unit tests for DeltaGrad (Wu, Dobriban & Davidson, ICML 2020) on the `fc` head: the L-BFGS product, the
exact-retrain oracle against plain autograd GD, and DeltaGrad's distance to it for a 1% deletion and addition."""
from __future__ import annotations

import math
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import config as config_mod
from pipeline.baselines.deltagrad import DeltaGrad, features, lbfgs_product
from pipeline.baselines.problem import load_problem

DIGITS = os.path.join(os.path.dirname(__file__), "..", "..", "jobs", "configs", "digits.yaml")


@pytest.fixture(scope="module")
def problem():
    """1% deletion: 10 of the 1038 private digits. DeltaGrad trains its own head: no shared original needed."""
    os.environ.setdefault("DPSISA_CACHE", "/tmp/dpsisa-test-cache")
    torch.set_num_threads(1)
    problem = load_problem(config_mod.load(DIGITS, []), count=10)
    assert len(problem.forget_ids) / len(problem.y) <= 0.01
    return problem


def _with(problem, **overrides):
    return replace(problem, config=problem.config.with_overrides({f"baselines.deltagrad_{k}": v for k, v in overrides.items()}))


@pytest.fixture(scope="module")
def outcome(problem):
    return DeltaGrad().unlearn(_with(problem, period=4), 0)


def _head(model) -> torch.Tensor:
    """θ = [W | b] flattened, of a classifier's head or of a bare nn.Linear."""
    fc = getattr(model, "fc", model)
    return torch.cat([fc.weight.detach(), fc.bias.detach()[:, None]], 1).double().reshape(-1)


def test_lbfgs_product_matches_the_bfgs_recursion():
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64)
    hessian = a @ a.T + torch.eye(6, dtype=torch.float64)
    s = [torch.randn(6, dtype=torch.float64) for _ in range(3)]
    y = [hessian @ v for v in s]
    b = (s[-1] @ y[-1]) / (s[-1] @ s[-1]) * torch.eye(6, dtype=torch.float64)
    for sk, yk in zip(s, y):
        bs = b @ sk
        b = b - torch.outer(bs, bs) / (sk @ bs) + torch.outer(yk, yk) / (yk @ sk)
    v = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(lbfgs_product(s, y, v), b @ v)
    torch.testing.assert_close(lbfgs_product(s, y, s[-1]), y[-1])  # secant condition


def test_oracle_is_plain_gd_on_the_retain_set(problem, outcome):
    """The exact retrain, redone with autograd on nn.Linear: mean CE + (λ/2)‖W, b‖², full-batch GD from the public head."""
    b = problem.config.baselines
    keep = np.setdiff1d(np.arange(len(problem.y)), problem.forget_ids)
    phi = features(problem)[keep].float()
    y = torch.from_numpy(problem.y[keep]).long()
    head = torch.nn.Linear(phi.shape[1], problem.num_classes)
    head.load_state_dict(problem.pretrained.fc.state_dict())
    for _ in range(b.deltagrad_iterations):
        head.zero_grad()
        loss = F.cross_entropy(head(phi), y) + b.deltagrad_l2 / 2 * sum((p ** 2).sum() for p in head.parameters())
        loss.backward()
        with torch.no_grad():
            for p in head.parameters():
                p -= b.deltagrad_lr * p.grad
    torch.testing.assert_close(_head(outcome.oracle[0]), _head(head), rtol=0, atol=1e-4)


@pytest.mark.parametrize("period, bound", [(4, 1e-2), (5, 0.2)])
def test_deltagrad_is_close_to_the_exact_retrain(problem, outcome, period, bound):
    """Relative error ‖θ_DG − θ_exact‖ / ‖θ_original − θ_exact‖ for a 1% deletion and addition. With T0 = 4 it is
    ≤ 1e-2 (measured 2e-3..7e-3 over forget sets); with the config's T0 = 5 and η = 0.5 the m = 2 L-BFGS error
    compounds to ~0.1 (an exact Hessian-vector product in its place gives 2.5e-3), so that bound is loose."""
    details = outcome.details if period == 4 else DeltaGrad().unlearn(_with(problem, period=period), 0).details
    for d in (details, details["add"]):
        assert 0 < d["l2_to_exact"] < bound * d["l2_original_to_exact"]
    if period == 4:
        models = {name: _head(m[0]) for name, m in (("dg", outcome.models), ("exact", outcome.oracle), ("orig", outcome.original))}
        assert float((models["dg"] - models["exact"]).norm()) < float((models["orig"] - models["exact"]).norm())


def test_outcome_models_and_accounting(problem, outcome):
    b = problem.config.baselines
    steps, n, r = b.deltagrad_iterations, len(problem.y), len(problem.forget_ids)
    d = problem.pretrained.fc.weight.numel() + problem.pretrained.fc.bias.numel()
    assert outcome.storage_bytes == 2 * steps * d * 8  # θ_t and ∇F(θ_t), float64
    exact_steps = sum(1 for t in range(steps) if t < b.deltagrad_burn_in or (t - b.deltagrad_burn_in) % 4 == 0)
    details = outcome.details
    assert details["gradient_evaluations"] == exact_steps * n + (steps - exact_steps) * r
    assert details["gradient_evaluations_exact"] == steps * (n - r)
    assert details["add"]["gradient_evaluations"] == details["gradient_evaluations"]
    assert details["add"]["gradient_evaluations_exact"] == steps * n
    assert details["gradient_evaluations_saved"] == details["gradient_evaluations_exact"] - details["gradient_evaluations"] > 0
    assert outcome.seconds > 0 and outcome.oracle_seconds > 0 and outcome.oracle_name == "retrain_head"
    assert math.isclose(details["speedup_vs_exact"], outcome.oracle_seconds / outcome.seconds)
    reference = dict(problem.pretrained.named_parameters())
    for models in (outcome.models, outcome.oracle, outcome.original):
        got = dict(models[0].named_parameters())
        assert list(got) == list(reference) and all(got[k].shape == reference[k].shape for k in got)
        assert all(torch.equal(got[k], reference[k]) for k in got if not k.startswith("fc."))
    assert not torch.equal(outcome.models[0].fc.weight, outcome.original[0].fc.weight)
