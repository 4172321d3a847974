"""DP-SGD invariants on the real training step (Opacus GradSampleModule + DPOptimizer)."""
import numpy as np
import pytest
import torch
from torch import nn

from pipeline.core.finetune import FinetunePlan
from pipeline.core.models import Classifier
from pipeline.core.privacy import Recipe, Stage
from pipeline.core.train import ShardState, ShardTrainer


def _linear_model(features: int = 64, classes: int = 50) -> Classifier:
    torch.manual_seed(0)
    return Classifier(nn.Flatten(), features, classes)


def _recipe(sigma, rate, lr=1.0, batch=10, clip=1.0, unit="sample") -> Recipe:
    return Recipe(0, (Stage(0, 0, rate, 1),), batch, lr, 0.0, sigma, clip, 1.0, 1.0, 1e-5, "rdp", unit)


def _update(trainer: ShardTrainer, model, x, y, owners=None) -> torch.Tensor:
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("fc.")}
    state = trainer.run_stage(ShardState(start), torch.from_numpy(x), torch.from_numpy(y), 0,
                              owners=None if owners is None else torch.as_tensor(owners))
    return torch.cat([(state.params[n] - start[n]).flatten() for n in start])


def test_clipping_bounds_each_samples_contribution():
    """With (almost) no noise, one step moves the weights by at most lr · n · C / B."""
    model = _linear_model()
    n, batch, clip = 8, 10, 0.5
    x = (np.random.default_rng(0).normal(size=(n, 64)) * 1000).astype(np.float32)  # huge gradients
    y = np.arange(n, dtype=np.int64)
    recipe = _recipe(1e-9, 1.0, batch=batch, clip=clip)
    trainer = ShardTrainer(model, FinetunePlan("full", ["fc.weight", "fc.bias"]), recipe, 0, 0)
    update = _update(trainer, model, x, y)
    assert update.norm() <= n * clip / batch * (1 + 1e-4)
    assert update.norm() > 0.5 * clip / batch  # and something did move


def test_noise_std_is_sigma_times_clip_over_expected_batch():
    """An empty Poisson batch still adds N(0, (σC)²)/B noise to every trainable element."""
    model = _linear_model()
    sigma, clip, batch = 2.0, 1.5, 10
    x, y = np.zeros((4, 64), np.float32), np.zeros(4, np.int64)
    recipe = _recipe(sigma, 1e-12, batch=batch, clip=clip)
    trainer = ShardTrainer(model, FinetunePlan("full", ["fc.weight", "fc.bias"]), recipe, 0, 0)
    update = _update(trainer, model, x, y)
    expected = sigma * clip / batch
    assert abs(update.std().item() / expected - 1) < 0.05
    assert abs(update.mean().item()) < 3 * expected / update.numel() ** 0.5


def test_non_private_step_has_no_noise():
    model = _linear_model()
    x, y = np.zeros((4, 64), np.float32), np.zeros(4, np.int64)
    recipe = Recipe(0, (Stage(0, 0, 1e-12, 1),), 10, 1.0, 0.0, None, 1.0, None, None, 1e-5, "rdp")
    update = _update(ShardTrainer(model, FinetunePlan("full", ["fc.weight", "fc.bias"]), recipe, 0, 0), model, x, y)
    assert torch.count_nonzero(update) == 0


def _one_person_owning_eight_identical_samples():
    """Eight copies of one sample with a huge gradient: per sample, each copy clips to C and they add up to 8C."""
    x = np.repeat((np.random.default_rng(0).normal(size=(1, 64)) * 1000).astype(np.float32), 8, axis=0)
    return x, np.full(8, 3, np.int64)


def test_a_subject_with_many_samples_contributes_at_most_C_to_a_step():
    """Unit "subject": the subject's per-sample gradients are summed, then clipped once to C."""
    model = _linear_model()
    batch, clip = 10, 0.5
    x, y = _one_person_owning_eight_identical_samples()
    trainer = ShardTrainer(model, FinetunePlan("full", ["fc.weight", "fc.bias"]), _recipe(1e-9, 1.0, batch=batch, clip=clip,
                                                                                              unit="subject"), 0, 0)
    update = _update(trainer, model, x, y, owners=np.zeros(8, np.int64))
    assert 0.99 * clip / batch <= update.norm() <= clip / batch * (1 + 1e-4)
    # the same samples with unit "sample" move the weights 8 times as far: the person counts 8 times
    per_sample = ShardTrainer(model, FinetunePlan("full", ["fc.weight", "fc.bias"]), _recipe(1e-9, 1.0, batch=batch, clip=clip), 0, 0)
    assert _update(per_sample, model, x, y).norm() >= 7.9 * clip / batch


def test_each_sampled_subject_is_clipped_separately():
    """Two subjects (eight samples and one): the step's summed clipped gradient is at most 2C, and
    more than C (each subject keeps its own clipped contribution)."""
    model = _linear_model()
    batch, clip = 10, 0.5
    x, y = _one_person_owning_eight_identical_samples()
    x = np.concatenate([x, -x[:1]])
    y = np.concatenate([y, [7]])
    trainer = ShardTrainer(model, FinetunePlan("full", ["fc.weight", "fc.bias"]), _recipe(1e-9, 1.0, batch=batch, clip=clip,
                                                                                              unit="subject"), 0, 0)
    update = _update(trainer, model, x, y, owners=np.array([0] * 8 + [1]))
    assert 1.01 * clip / batch < update.norm() <= 2 * clip / batch * (1 + 1e-4)


def test_unit_subject_without_owners_is_refused():
    model = _linear_model()
    x, y = _one_person_owning_eight_identical_samples()
    trainer = ShardTrainer(model, FinetunePlan("full", ["fc.weight", "fc.bias"]), _recipe(1.0, 1.0, unit="subject"), 0, 0)
    with pytest.raises(ValueError, match="subject"):
        _update(trainer, model, x, y)
