"""Unit tests for pipeline.baselines.unlearnable (error-minimizing noise, Huang et al. 2021) on scikit-learn digits."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.baselines.base import BaselineError
from pipeline.baselines.unlearnable import check_fractions, error_minimizing_noise, run_unlearnable
from pipeline.core.models import build
from pipeline.data import datasets

EPS = 8 / 255
TINY = ("data.private_limit=300", "data.test_limit=120", "model.width=8", "baselines.unlearnable_epochs=2",
        "baselines.unlearnable_rounds=2", "baselines.unlearnable_steps=3")


@pytest.fixture(scope="module")
def digits():
    from pipeline import config as config_mod

    config = config_mod.load(os.path.join(os.path.dirname(__file__), "..", "..", "jobs", "configs", "digits.yaml"),
                             ["data.private_limit=400"])
    data = datasets.load(config.data)
    x = torch.from_numpy(np.array(data.private.x, np.float32))
    y = torch.from_numpy(np.asarray(data.private.y, np.int64))
    return data, x, y


def _noise(data, x, y, rounds=3, train_steps=10, seed=0, model=None):
    model = model or build("gn_cnn", data.input_shape, data.num_classes, 8, seed=1)
    mean, std = datasets.NORMALISATION[data.name]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    delta, facts = error_minimizing_noise(model, x, y, EPS, 5, rounds, mean=mean, std=std, optimizer=optimizer, batch_size=64,
                                          generator=torch.Generator().manual_seed(seed), train_steps=train_steps)
    return model, delta, facts


def _ce(model, x, y) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model.eval()(x), y))


def test_noise_respects_pixel_budget_and_range(digits):
    data, x, y = digits
    _, delta, facts = _noise(data, x, y)
    (mean,), (std,) = datasets.NORMALISATION[data.name]
    pixels, perturbed = x * std + mean, (x + delta) * std + mean
    assert float((delta * std).abs().max()) <= EPS + 1e-6  # L∞ ≤ ε in pixel units
    assert float((delta * std).abs().max()) >= 0.9 * EPS  # and the budget is actually used
    assert float(perturbed.min()) >= -1e-6 and float(perturbed.max()) <= 1 + 1e-6
    assert float(pixels.min()) == pytest.approx(0, abs=1e-6) and float(pixels.max()) == pytest.approx(1, abs=1e-6)  # clipping bites
    assert 1 <= facts["rounds"] <= 3 and 0 <= facts["train_accuracy"] <= 1


def test_noise_is_deterministic(digits):
    data, x, y = digits
    _, a, _ = _noise(data, x[:100], y[:100], rounds=1, seed=3)
    _, b, _ = _noise(data, x[:100], y[:100], rounds=1, seed=3)
    assert torch.equal(a, b)


def test_noise_minimises_the_loss_of_a_fixed_model(digits):
    """With no model training (train_steps=0), PGD descent alone must lower CE below clean and random-noise inputs."""
    data, x, y = digits
    model = build("gn_cnn", data.input_shape, data.num_classes, 8, seed=1)
    _, delta, _ = _noise(data, x, y, rounds=1, train_steps=0, model=model)
    (std,) = datasets.NORMALISATION[data.name][1]
    random = (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1) * EPS / std
    clean, noisy = _ce(model, x, y), _ce(model, x + delta, y)
    assert noisy < clean and noisy < _ce(model, x + random, y)


def test_min_min_noise_model_fits_perturbed_data_better_than_clean(digits):
    data, x, y = digits
    model, delta, facts = _noise(data, x, y, rounds=4)
    assert facts["loss"] == pytest.approx(_ce(model, x + delta, y), rel=1e-4)
    assert facts["loss"] < 0.8 * facts["clean_loss"]
    assert facts["clean_loss"] == pytest.approx(_ce(model, x, y), rel=1e-4)


def test_run_unlearnable_contract(digits_config, caplog):
    config = digits_config(*TINY)
    caplog.set_level(logging.INFO, logger="pipeline")
    out = run_unlearnable(config, (0, 0.5, 1.0))
    assert out.dataset == "digits" and out.private_samples == 300 and out.test_samples == 120
    assert out.budget == pytest.approx(EPS) and out.noise_seconds >= 0 and 0 <= out.noise_train_accuracy <= 1
    assert 1 <= out.noise_rounds <= 2 and 0 <= out.random_noise_accuracy <= 1
    rows = out.rows
    assert [r["fraction"] for r in rows] == [0.0, 0.5, 1.0]
    assert [(r["unlearnable_samples"], r["clean_samples"]) for r in rows] == [(0, 300), (150, 150), (300, 0)]
    # f = 0: Du is empty, so "Dc only" and "Dc + Du" are one and the same training run
    assert rows[0]["clean_only_accuracy"] == rows[0]["with_unlearnable_accuracy"]
    assert rows[2]["clean_only_accuracy"] is None  # f = 1: no clean data to train on
    for r in rows:
        assert 0 <= r["with_unlearnable_accuracy"] <= 1 and r["seconds"] >= 0
    assert 0 <= rows[1]["clean_only_accuracy"] <= 1
    assert any("fraction 1.00" in line for line in caplog.messages)
    assert "Dc only" in out.human() and "random_noise_accuracy" in out.to_dict()
    again = run_unlearnable(config, (0.5,), random_control=False)
    assert again.rows[0]["with_unlearnable_accuracy"] == rows[1]["with_unlearnable_accuracy"]  # seeded: reproducible


@pytest.mark.parametrize("fractions, match", [((), "at least one"), ((0.2, 1.5), r"\[0, 1\]"), ((-0.1,), r"\[0, 1\]"),
                                              ((0.2, 0.2), "repeat")])
def test_bad_fractions_raise(digits_config, fractions, match):
    with pytest.raises(BaselineError, match=match):
        check_fractions(fractions)
    with pytest.raises(BaselineError, match=match):
        run_unlearnable(digits_config(*TINY), fractions)
