"""The one-run canary audit end to end on real Ray (2 CPUs), digits: it has power and it is right.

(a) training that memorises (no DP) gets a clearly positive bound; (b) correct DP-SGD stays below its
accountant's ε; (c) the same run with its noise silently cut to σ/100, while its recipe still claims
ε=1, gets a bound above 1. (b) and (c) use one shard and one slice: the audit checks the training
core's DP, and a single model memorises fastest on 2 CPUs.
"""
from __future__ import annotations

import dataclasses
import json
import os

import pyarrow.parquet as pq
import pytest

from pipeline import audit, runs

pytestmark = pytest.mark.slow

AUDIT = os.path.join(os.path.dirname(__file__), "..", "..", "jobs", "configs", "audit_digits.yaml")
CANARIES = 200
SINGLE_MODEL = ("shards.count=1", "shards.slices=1", "train.epochs=20")


@pytest.fixture
def audit_config():
    from pipeline import config as config_mod

    return lambda *overrides: config_mod.load(AUDIT, list(overrides))


def test_training_without_dp_is_caught_by_the_canaries(ray_2cpu, audit_config, tmp_path):
    result = audit.run_audit(audit_config("privacy.epsilon=null"), CANARIES, log=lambda _: None,
                             run_dir=tmp_path / "no-dp", compare_clean=False)
    assert result["epsilon"] is None and result["bound_over_epsilon"] is None
    assert result["epsilon_lower_bound"] > 1.5  # measured 2.04 (96 of 100 guesses right)
    assert result["attack"] == "loss" and result["canaries"] == CANARIES
    assert result["correct_guesses"] <= result["guesses"] <= CANARIES
    # the canaries went through the data layer: ids n..n+k-1 in the ledger, over both shards and every slice
    run_dir = tmp_path / "no-dp"
    assert runs.load_run_config(run_dir).data.canaries == CANARIES
    table = pq.read_table(run_dir / "ledger" / "assignments.parquet").to_pandas()
    canary_rows = table[table["sample_id"] >= 1038]
    assert len(canary_rows) == result["canaries_included"] and set(canary_rows["shard"]) == {0, 1}
    assert set(canary_rows["slice"]) == {0, 1, 2}
    assert json.loads((run_dir / "audit.json").read_text())["epsilon_lower_bound"] == result["epsilon_lower_bound"]
    assert "one-run audit: ε ≥" in audit.format_audit(result)


def test_correct_dp_training_stays_below_its_epsilon(ray_2cpu, audit_config, tmp_path):
    result = audit.run_audit(audit_config(*SINGLE_MODEL), CANARIES, log=lambda _: None, run_dir=tmp_path / "dp")
    assert 0.95 <= result["epsilon"] <= 1.0
    assert result["epsilon_lower_bound"] <= result["epsilon"]
    assert result["bound_over_epsilon"] == pytest.approx(result["epsilon_lower_bound"] / result["epsilon"])
    clean = tmp_path / "dp" / audit.CLEAN_RUN
    assert result["clean_run_dir"] == str(clean) and 0 < result["test_accuracy_without_canaries"] <= 1
    assert runs.load_run_config(clean).data.canaries == 0
    assert runs.load_run_config(clean).data.test_limit == result["test_samples"] == 359 - CANARIES
    # MLflow: one audit run, the parent of both run directories' parent runs (audit → run directory → verb)
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    (audited,) = client.search_runs(experiments, "tags.`dpsisa.kind` = 'audit'")
    assert audited.info.status == "FINISHED" and audited.data.params["data.canaries"] == str(CANARIES)
    assert audited.data.metrics["epsilon_lower_bound"] == pytest.approx(result["epsilon_lower_bound"])
    parents = client.search_runs(experiments, f"tags.mlflow.parentRunId = '{audited.info.run_id}'")
    assert sorted(p.info.run_name for p in parents) == [audit.CLEAN_RUN, "dp"]


def test_silently_cut_noise_is_caught_although_the_recipe_claims_epsilon_one(ray_2cpu, audit_config, tmp_path, monkeypatch):
    # Recipes are made in the driver (runs.train) and shipped to the shard actors, so cutting σ here
    # reaches training, while each recipe keeps the ε its calibration claimed.
    honest = runs.make_recipe

    def cut_noise(config, shard, slice_sizes):
        recipe = honest(config, shard, slice_sizes)
        return dataclasses.replace(recipe, noise_multiplier=recipe.noise_multiplier / 100)

    monkeypatch.setattr(runs, "make_recipe", cut_noise)
    result = audit.run_audit(audit_config(*SINGLE_MODEL), CANARIES, log=lambda _: None, run_dir=tmp_path / "broken",
                             compare_clean=False)
    recipe = json.loads((tmp_path / "broken" / "recipes.json").read_text())[0]
    assert recipe["noise_multiplier"] < 0.05 and 0.95 <= recipe["epsilon_spent"] <= 1.0  # the claim stands
    assert 0.95 <= result["epsilon"] <= 1.0
    assert result["epsilon_lower_bound"] > 1.0  # measured 2.04: the audit refutes the claimed ε


@pytest.mark.parametrize("canaries, message", [("1", "at least 2"), ("100000", "--canaries 100000")])
def test_audit_command_refuses_impossible_canary_counts_with_exit_3_before_training(tmp_path, capsys, canaries, message):
    from pipeline import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["audit", "jobs/configs/audit_digits.yaml", "--canaries", canaries, "--run-dir", "audit", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 3 and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "audit").exists()
