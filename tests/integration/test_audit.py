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

from pipeline.verbs import audit, runs

pytestmark = pytest.mark.slow

AUDIT = os.path.join(os.path.dirname(__file__), "..", "..", "jobs", "configs", "audit_digits.yaml")
CANARIES = 200
SINGLE_MODEL = ("shards.count=1", "shards.slices=1", "train.epochs=20")


@pytest.fixture
def audit_config():
    from pipeline import config as config_mod

    return lambda *overrides: config_mod.load(AUDIT, list(overrides))


def test_training_without_dp_is_caught_by_the_canaries(ray_2cpu, audit_config, tmp_path):
    result = audit.run_audit(audit_config("privacy.epsilon=null"), CANARIES,
                             run_dir=tmp_path / "no-dp", compare_clean=False)
    assert result.epsilon is None and result.bound_over_epsilon is None
    assert result.epsilon_lower_bound > 1.5  # measured 2.04 (96 of 100 guesses right)
    assert result.attack == "loss" and result.canaries == CANARIES
    assert result.correct_guesses <= result.guesses <= CANARIES
    # the canaries went through the data layer: ids n..n+k-1 in the ledger, over both shards and every slice
    run_dir = tmp_path / "no-dp"
    assert runs.load_run_config(run_dir).data.canaries == CANARIES
    table = pq.read_table(run_dir / "ledger" / "assignments.parquet").to_pandas()
    canary_rows = table[table["sample_id"] >= 1038]
    assert len(canary_rows) == result.canaries_included and set(canary_rows["shard"]) == {0, 1}
    assert set(canary_rows["slice"]) == {0, 1, 2}
    assert json.loads((run_dir / "audit.json").read_text())["epsilon_lower_bound"] == result.epsilon_lower_bound
    assert "one-run audit: ε ≥" in result.human()


def test_correct_dp_training_stays_below_its_epsilon(ray_2cpu, audit_config, tmp_path):
    result = audit.run_audit(audit_config(*SINGLE_MODEL), CANARIES, run_dir=tmp_path / "dp")
    assert 0.95 <= result.epsilon <= 1.0
    assert result.epsilon_lower_bound <= result.epsilon
    assert result.bound_over_epsilon == pytest.approx(result.epsilon_lower_bound / result.epsilon)
    clean = tmp_path / "dp" / audit.CLEAN_RUN
    assert result.clean_run_dir == str(clean) and 0 < result.test_accuracy_without_canaries <= 1
    assert runs.load_run_config(clean).data.canaries == 0
    assert runs.load_run_config(clean).data.test_limit == result.test_samples == 359 - CANARIES
    # MLflow: one audit run, the parent of both run directories' parent runs (audit → run directory → verb)
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    (audited,) = client.search_runs(experiments, "tags.`dpsisa.kind` = 'audit'")
    assert audited.info.status == "FINISHED" and audited.data.params["data.canaries"] == str(CANARIES)
    assert audited.data.metrics["epsilon_lower_bound"] == pytest.approx(result.epsilon_lower_bound)
    parents = client.search_runs(experiments, f"tags.mlflow.parentRunId = '{audited.info.run_id}'")
    assert sorted(p.info.run_name for p in parents) == [audit.CLEAN_RUN, "dp"]


def test_silently_cut_noise_is_caught_although_the_recipe_claims_epsilon_one(ray_2cpu, audit_config, tmp_path, monkeypatch):
    # Recipes are made in the driver (runs.train) and shipped to the shard actors, so cutting σ here
    # reaches training, while each recipe keeps the ε its calibration claimed.
    honest = runs.make_recipe

    def cut_noise(config, shard, slice_sizes, *args, **kwargs):
        recipe = honest(config, shard, slice_sizes, *args, **kwargs)
        return dataclasses.replace(recipe, noise_multiplier=recipe.noise_multiplier / 100)

    monkeypatch.setattr(runs, "make_recipe", cut_noise)
    result = audit.run_audit(audit_config(*SINGLE_MODEL), CANARIES, run_dir=tmp_path / "broken",
                             compare_clean=False)
    recipe = json.loads((tmp_path / "broken" / "recipes.json").read_text())[0]
    assert recipe["noise_multiplier"] < 0.05 and 0.95 <= recipe["epsilon_spent"] <= 1.0  # the claim stands
    assert 0.95 <= result.epsilon <= 1.0
    assert result.epsilon_lower_bound > 1.0  # measured 2.04: the audit refutes the claimed ε


@pytest.mark.parametrize("canaries, message", [("1", "at least 2"), ("100000", "--canaries 100000")])
def test_audit_command_refuses_impossible_canary_counts_with_exit_3_before_training(tmp_path, capsys, canaries, message):
    from pipeline import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["audit", "jobs/configs/audit_digits.yaml", "--canaries", canaries, "--run-dir", "audit", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 3 and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "audit").exists()


def test_lira_with_reference_models_finds_the_members_of_a_run_without_dp_and_reuses_its_references(
        ray_2cpu, audit_config, tmp_path, capsys):
    from pipeline import cli

    target = tmp_path / "target"
    # two shards: the target's actors must be released before the references (2 CPUs) are opened in turn
    runs.train(audit_config("privacy.epsilon=null", "data.keep_half=7"), target)
    members, _ = runs.trained_ids(target)
    assert 450 < len(members) < 590  # a random half of the 1038 private ids; the rest are its non-members
    result = runs.evaluate_run(target, reference_models=4)
    lr = result["lira"]
    assert lr["reference_models"] == 4 and lr["nonmembers_from"].startswith("private") and lr["fixed_variance"]
    # measured: offline AUC 0.585 (0.551..0.620); online 0.505 (0.470..0.540): with K=4 each example's
    # "in" and "out" means come from two models each, noisier than the in/out gap (README)
    assert lr["offline"]["auc_ci"][0] > 0.5
    for variant in ("offline", "online"):
        v = lr[variant]
        assert v["unscored"] == 0 and v["members"] == v["nonmembers"] == min(len(members), 1038 - len(members))
        assert v["tpr_at_1pct_fpr_ci"][0] <= v["tpr_at_1pct_fpr"] <= v["tpr_at_1pct_fpr_ci"][1]
        assert v["auc_ci"][0] <= v["auc"] <= v["auc_ci"][1]
    assert lr["offline"]["auc"] > result["mia"]["posterior"]["auc"]  # per-example references beat one global threshold
    halves = [set(runs.trained_ids(target / "lira" / f"ref-{j}")[0].tolist()) for j in range(4)]
    assert not halves[0] & halves[1] and len(halves[0] | halves[1]) == 1038  # complementary halves of the pool
    assert runs.load_run_config(target / "lira" / "ref-2").seed == 10_002
    from pipeline.storage.rundir import open_run
    same_public_model = {open_run(d).model_info()["sha256"] for d in [target, *(target / "lira" / f"ref-{j}" for j in range(4))]}
    assert len(same_public_model) == 1  # the references start from the target's pretrained model

    stamps = [(target / "lira" / f"ref-{j}" / "train_summary.json").stat().st_mtime for j in range(2)]
    cli.main(["evaluate", "--run-dir", str(target), "--attack", "lira", "--reference-models", "2", "--json", "--quiet"])
    again = json.loads(capsys.readouterr().out)["lira"]
    assert stamps == [(target / "lira" / f"ref-{j}" / "train_summary.json").stat().st_mtime for j in range(2)]  # reused
    assert again["online"] is None and "K ≥ 4" in again["online_skipped"] and again["offline"]["auc"] > 0.5
    for argv, message in ((["--reference-models", "1"], "at least 2"), ([], "needs --reference-models")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["evaluate", "--run-dir", str(target), "--attack", "lira", *argv, "--quiet"])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code != 0 and len(err.splitlines()) == 1 and message in err
    assert not (target / "lira" / "ref-4").exists()
