"""Unit tests for amnesiac unlearning (`amnesiac_batch`, Graves et al. 2021) and its per-sample variant
(`amnesiac_sample`, report 004), checked against an independent snapshot of the real training run."""
from __future__ import annotations

import copy
import os
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import config as config_mod
from pipeline.baselines.amnesiac import AmnesiacBatch, AmnesiacSample, per_sample_grads
from pipeline.baselines.base import tensor_bytes
from pipeline.baselines.problem import load_problem, train_original

DIGITS = os.path.join(os.path.dirname(__file__), "..", "..", "jobs", "configs", "digits.yaml")


class Snapshots:
    """An independent hook: θ_t before and θ_{t+1} after every step, the batch and its ids."""

    def __init__(self, order: np.ndarray):
        self.order = order
        self.before, self.after, self.ids, self.x, self.y = [], [], [], [], []

    def before_step(self, stage, positions, x, y, module, names, params) -> None:
        self.names = list(names)
        self.before.append([p.detach().clone() for p in params])
        self.ids.append(self.order[positions.numpy()])
        self.x.append(x.clone())
        self.y.append(y.clone())

    def after_step(self, stage, names, params) -> None:
        self.after.append([p.detach().clone() for p in params])

    def record(self):
        return self


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


@pytest.fixture(scope="module")
def run():
    os.environ.setdefault("DPSISA_CACHE", "/tmp/dpsisa-test-cache")
    torch.set_num_threads(1)
    config = config_mod.load(DIGITS, ["train.epochs=3"])
    problem = load_problem(config, count=20)
    recorders = {"amnesiac_batch": AmnesiacBatch().recorder(problem), "amnesiac_sample": AmnesiacSample().recorder(problem),
                 "snapshots": Snapshots(problem.train_order)}
    train_original(problem, recorders=recorders)
    records = {name: pickle.loads(pickle.dumps(r.record())) for name, r in recorders.items() if name != "snapshots"}
    return problem, records, recorders["snapshots"]


def _model_with(problem, names, tensors):
    model = copy.deepcopy(problem.pretrained)
    model.load_state_dict({**model.state_dict(), **dict(zip(names, tensors))})
    return model.train()


def test_batch_updates_are_the_real_steps(run):
    problem, records, snap = run
    record = records["amnesiac_batch"]
    assert record["names"] == snap.names == list(problem.plan.trainable)
    assert len(record["ids"]) == len(snap.before) == problem.recipe.stages[0].steps
    for t, (before, after) in enumerate(zip(snap.before, snap.after)):
        assert torch.equal(record["updates"][t], _flat(after) - _flat(before))
        assert np.array_equal(record["ids"][t], snap.ids[t])
    named = dict(problem.original.named_parameters())
    assert torch.equal(_flat(snap.after[-1]), _flat(named[n] for n in snap.names))


def test_undoing_every_batch_returns_the_pretrained_weights(run):
    problem, records, _ = run
    everything = replace(problem, forget_ids=np.arange(len(problem.y), dtype=np.int64))
    model = problem.original_copy()
    details = AmnesiacBatch().undo(model, everything, records["amnesiac_batch"])
    assert details["batches_touched"] == details["batches_total"]
    pretrained = dict(problem.pretrained.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), pretrained[name].detach(), rtol=0, atol=1e-5)


def _step_weight(problem, t: int) -> float:
    """lr/B · Σ_{k=0}^{T−1−t} μ^k: how much of a gradient at step t reaches θ_T under SGD with momentum."""
    recipe = problem.recipe
    steps = sum(s.steps for s in recipe.stages)
    return recipe.lr / recipe.batch_size * sum(recipe.momentum ** k for k in range(steps - t))


def test_per_sample_gradients_match_single_sample_backward(run):
    problem, records, snap = run
    kept = records["amnesiac_sample"]["kept"]
    model = _model_with(problem, snap.names, snap.before[0])
    got = per_sample_grads(model, snap.x[0], snap.y[0], kept)
    for i in range(len(snap.y[0])):
        model.zero_grad()
        F.cross_entropy(model(snap.x[0][i: i + 1]), snap.y[0][i: i + 1], reduction="sum").backward()
        want = _flat(p.grad for p in model.parameters())[kept]
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-6)


def test_stored_per_sample_contributions_match_independent_gradients(run):
    problem, records, snap = run
    record = records["amnesiac_sample"]
    kept = record["kept"]
    checked = np.concatenate([problem.forget_ids, problem.train_order[:10]])
    expected = {int(i): torch.zeros(len(kept)) for i in checked}
    for t, ids in enumerate(snap.ids):
        rows = [r for r, i in enumerate(ids) if int(i) in expected]
        if not rows:
            continue
        model = _model_with(problem, snap.names, snap.before[t])
        for r in rows:
            model.zero_grad()
            F.cross_entropy(model(snap.x[t][r: r + 1]), snap.y[t][r: r + 1], reduction="sum").backward()
            expected[int(ids[r])] -= _step_weight(problem, t) * _flat(p.grad for p in model.parameters())[kept]
    assert any(v.abs().sum() > 0 for v in expected.values())
    for i, want in expected.items():
        torch.testing.assert_close(record["contributions"][i], want, rtol=1e-4, atol=1e-7)


def test_per_sample_contributions_add_up_to_the_training_change(run):
    """Σ_i c_i = θ_T − θ_0 on the kept elements: the momentum weighting is exact, and undoing every sample
    returns the kept elements to their pretrained values (the others stay at the original's)."""
    problem, records, _ = run
    record = records["amnesiac_sample"]
    kept, names = record["kept"], record["names"]
    original = _flat(dict(problem.original.named_parameters())[n] for n in names)
    pretrained = _flat(dict(problem.pretrained.named_parameters())[n] for n in names)
    torch.testing.assert_close(record["contributions"].sum(0), (original - pretrained)[kept], rtol=0, atol=1e-5)
    model = problem.original_copy()
    AmnesiacSample().undo(model, replace(problem, forget_ids=np.arange(len(problem.y), dtype=np.int64)), record)
    undone = _flat(dict(model.named_parameters())[n] for n in names)
    torch.testing.assert_close(undone[kept], pretrained[kept], rtol=0, atol=1e-5)
    others = torch.ones(len(undone), dtype=torch.bool)
    others[kept] = False
    assert torch.equal(undone[others], original[others])


def test_storage_is_the_stored_tensors_and_per_sample_is_smaller(run):
    problem, records, _ = run
    batch, sample = records["amnesiac_batch"], records["amnesiac_sample"]
    m = sum(p.numel() for p in problem.original.parameters())
    steps = problem.recipe.stages[0].steps
    assert tensor_bytes(batch) == steps * m * 4 + sum(len(ids) for ids in batch["ids"]) * 8
    k = len(sample["kept"])
    assert k == round(problem.config.baselines.amnesiac_fraction * m)
    assert tensor_bytes(sample) == len(problem.y) * k * 4 + k * 8
    assert problem.config.baselines.amnesiac_fraction < problem.config.train.epochs / problem.recipe.batch_size  # p < E/B
    outcomes = {m.name: m.unlearn(problem, 0, records[m.name]) for m in (AmnesiacBatch(), AmnesiacSample())}
    assert outcomes["amnesiac_batch"].storage_bytes == tensor_bytes(batch)
    assert outcomes["amnesiac_sample"].storage_bytes == tensor_bytes(sample)
    assert outcomes["amnesiac_sample"].storage_bytes < outcomes["amnesiac_batch"].storage_bytes


@pytest.mark.parametrize("method", [AmnesiacBatch, AmnesiacSample])
def test_unlearn_returns_a_changed_model_like_the_original(run, method):
    problem, records, _ = run
    outcome = method().unlearn(problem, 1, records[method.name])
    (model,) = outcome.models
    original = dict(problem.original.named_parameters())
    got = dict(model.named_parameters())
    assert list(got) == list(original) and all(got[n].shape == original[n].shape for n in got)
    assert any(not torch.equal(got[n], original[n]) for n in got)
    assert outcome.seconds > 0 and outcome.storage_bytes > 0
    assert outcome.details["finetune_epochs"] == problem.config.baselines.amnesiac_finetune_epochs
    if method is AmnesiacBatch:
        d = outcome.details
        assert 0 < d["batches_touched"] <= d["batches_total"]
        assert d["batches_touched_share"] == d["batches_touched"] / d["batches_total"]
