"""The white-box audit end to end (no Ray: it trains shard 0 in-process), digits, `full`, M=200, ε=1.

A correct run stays below its ε and passes the noise calibration; a run whose noise is silently halved
while its recipe still claims ε=1 fails the calibration; one whose noise is cut to σ/100 gets a bound
far above ε (the positive control). The faults are injected here, never read by production code: the
trainer the audit builds gets a recipe with less noise, after the accountant calibrated σ for ε=1.
"""
from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline.verbs import audit_whitebox

pytestmark = pytest.mark.slow

CANARIES = 200
RECIPE = ("finetune.strategy=full", "privacy.epsilon=1", "shards.slices=1", "train.epochs=2")  # 17 steps


def _with_noise_scaled(monkeypatch, scale: float) -> None:
    honest = audit_whitebox.ShardTrainer

    class CutNoise(honest):
        def __init__(self, pretrained, plan, recipe, *args, **kwargs):
            super().__init__(pretrained, plan, dataclasses.replace(recipe, noise_multiplier=recipe.noise_multiplier * scale),
                             *args, **kwargs)

    monkeypatch.setattr(audit_whitebox, "ShardTrainer", CutNoise)


def _audit(digits_config, tmp_path, name: str) -> audit_whitebox.WhiteBoxAuditResult:
    return audit_whitebox.run_whitebox_audit(digits_config(*RECIPE), CANARIES, run_dir=tmp_path / name)


def test_white_box_audit_of_correct_dp_stays_below_epsilon_and_passes_noise_calibration(tmp_path, capsys):
    from pipeline import cli

    cli.main(["audit", "jobs/configs/digits.yaml", *RECIPE, "--white-box", "--canaries", str(CANARIES),
              "--run-dir", str(tmp_path / "honest"), "--json", "--quiet"])
    result = json.loads(capsys.readouterr().out)
    assert 0.95 <= result["epsilon"] <= 1.0 and result["strategy"] == "full" and result["unit"] == "sample"
    assert result["epsilon_lower_bound"] <= result["epsilon"]
    assert result["noise_calibration_p"] > 0.01  # measured 0.52
    assert 0 < result["epsilon_lower_bound_ceiling"] < result["epsilon"]
    assert result["epsilon_lower_bound_ideal"] <= result["epsilon_lower_bound_ideal_p99"] < result["epsilon"]
    assert result["canaries"] == CANARIES and result["steps"] == sum(result["stage_steps"]) == 17
    assert result["sigma"] > 1 and len(result["sample_rate"]) == 1 and result["score"] == "log_likelihood_ratio"
    saved = json.loads((tmp_path / "honest" / "audit.json").read_text())
    assert saved["white_box"] and len(saved["canary_scores"]) == CANARIES


def test_silently_halved_noise_claiming_epsilon_one_fails_the_noise_calibration(digits_config, tmp_path, monkeypatch):
    _with_noise_scaled(monkeypatch, 0.5)
    result = _audit(digits_config, tmp_path, "halved")
    assert 0.95 <= result.epsilon <= 1.0  # the claim stands: the recorded σ is the calibrated one
    assert result.noise_calibration_p < 0.01  # measured 3e-11 (M=200, 17 steps)


def test_noise_cut_to_a_hundredth_gives_a_bound_far_above_the_claimed_epsilon(digits_config, tmp_path, monkeypatch):
    _with_noise_scaled(monkeypatch, 0.01)
    result = _audit(digits_config, tmp_path, "cut")
    assert 0.95 <= result.epsilon <= 1.0
    assert result.epsilon_lower_bound > 1.5  # measured 1.96 (141/150 guesses right)
    assert result.epsilon_lower_bound > result.epsilon_lower_bound_ideal_p99


def test_white_box_audit_refuses_more_canaries_than_half_the_trainable_parameters_with_exit_3(tmp_path, capsys):
    from pipeline import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["audit", "jobs/configs/digits.yaml", "--white-box", "--canaries", "5000", "--run-dir",
                  str(tmp_path / "refused"), "--quiet"])  # fc_gn: a few hundred trainable parameters
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 3 and len(err.splitlines()) == 1 and "finetune.strategy=full" in err
    assert not (tmp_path / "refused").exists()


def test_skip_clean_with_the_white_box_audit_is_refused_with_one_line_and_exit_3(tmp_path, capsys):
    from pipeline import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["audit", "jobs/configs/digits.yaml", "--white-box", "--skip-clean", "--run-dir",
                  str(tmp_path / "refused"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 3 and len(err.splitlines()) == 1 and "--skip-clean" in err
    assert not (tmp_path / "refused").exists()
