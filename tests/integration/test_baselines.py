"""`dpsisa baselines`: every registered method on one digits problem, the yardstick's JSON contract,
bad-input refusals, class forgetting and the MLflow parent/child runs (real Ray, real MLflow)."""
from __future__ import annotations

import json
import tempfile

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import cli
from pipeline import config as config_mod
from pipeline.baselines import METHODS, get, results
from pipeline.baselines.problem import load_problem, train_original

CONFIG = "jobs/configs/baselines_digits.yaml"
ROW_KEYS = {"method", "family", "forget_accuracy", "retain_accuracy", "test_accuracy", "mia_auc", "kl_to_oracle",
            "l2_to_oracle", "score", "seconds", "speedup", "storage_bytes"}


@pytest.fixture(scope="module")
def problem():
    torch.set_num_threads(1)
    config = config_mod.load(CONFIG)
    problem = load_problem(config, count=10)
    problem.workdir = tempfile.mkdtemp(prefix="dpsisa-baselines-")
    recorders = {n: r for n in METHODS if (r := get(n).recorder(problem)) is not None}
    train_original(problem, recorders)
    return problem, {n: r.record() for n, r in recorders.items()}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_returns_a_changed_model_of_the_same_architecture_with_time_and_storage(problem, name):
    problem, records = problem
    before = {n: p.clone() for n, p in problem.original.state_dict().items()}
    out = get(name).unlearn(problem, problem.config.seed, records.get(name))
    assert all(torch.equal(before[n], p) for n, p in problem.original.state_dict().items())  # original untouched
    assert out.seconds >= 0 and out.storage_bytes >= 0 and out.models
    reference = out.original or [problem.original]
    for model, start in zip(out.models, reference):
        assert type(model) is type(problem.original)
        shapes = {n: p.shape for n, p in model.state_dict().items()}
        assert shapes == {n: p.shape for n, p in problem.original.state_dict().items()}
        changed = any(not torch.equal(p, start.state_dict()[n]) for n, p in model.state_dict().items())
        assert changed == (name != "dp_nothing"), f"{name}: parameters changed={changed}"
    if out.oracle is not None:
        assert len(out.oracle) == len(out.models) and out.oracle_name != "retrain"


def test_sisa_forgetting_at_one_shard_equals_retraining_with_its_recorded_draws_bit_for_bit(problem):
    problem, _ = problem
    config = problem.config.with_overrides({"baselines.sisa_shards": 1, "baselines.sisa_slices": 1})
    one = type(problem)(**{**problem.__dict__, "config": config})
    retrained = get("retrain").unlearn(one, config.seed).models[0].state_dict()  # the original training's draws
    sisa = get("sisa").unlearn(one, config.seed)  # Shard + ledger + checkpoints: the product's path
    assert all(torch.equal(sisa.oracle[0].state_dict()[n], p) for n, p in sisa.models[0].state_dict().items())
    # the replay drew fresh sampling (and noise): it is a new release, not the original's randomness again
    assert any(not torch.equal(retrained[n], p) for n, p in sisa.models[0].state_dict().items())
    assert sisa.details["shards_replayed"] == [0]


@pytest.mark.no_mlflow_store
@pytest.mark.parametrize("args, message", [
    (["--forget", "5", "--methods", "retrain,nosuch"], "unknown method(s) nosuch"),
    (["--forget", "5", "--methods", "retrain,,sisa"], "empty item"),
    (["--forget", "0"], "--forget must be at least 1"),
    (["--forget", "100000"], "is not smaller than the private set"),
    (["--forget-class", "10"], "--forget-class 10 does not exist"),
    (["--forget-fraction", "1.5"], "--forget-fraction must be in (0, 1)"),
    (["--forget", "5", "--forget-fractions", "0.1,2"], "must each be in (0, 1)"),
    (["--forget", "5", "--k", "0"], "--k must be at least 1"),
])
def test_bad_requests_exit_3_with_one_line_and_write_nothing(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["baselines", CONFIG, "--out-dir", "cmp", "--quiet", *args])
    assert exit_info.value.code == 3
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "cmp").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.no_mlflow_store
def test_baselines_under_person_level_privacy_are_refused_with_one_line_and_write_nothing(tmp_path, capsys):
    """The baselines train one model on a single slice of samples: no data subjects per slice, so
    privacy.unit=subject (the default when partitioning by subject) cannot be accounted; refused."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["baselines", CONFIG, "partition.strategy=by_subject", "--forget", "5", "--methods", "retrain",
                  "--out-dir", "cmp", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 3 and len(err.splitlines()) == 1 and "privacy.unit=sample" in err
    assert not (tmp_path / "cmp").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_the_comparison_prints_the_json_table_writes_plots_and_logs_one_parent_with_a_child_per_method(
        ray_2cpu, tmp_path, capsys):
    cli.main(["baselines", CONFIG, "--forget", "10", "--k", "2", "--forget-fractions", "0.05",
              "--out-dir", "cmp", "--json", "--quiet"])
    result = json.loads(capsys.readouterr().out)
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == set(METHODS)
    for row in rows.values():
        assert ROW_KEYS <= set(row) and row["family"] in ("exact", "certified", "approximate")
        assert len(row["mia_auc_ci"]) == 2 and row["mia_auc_ci"][0] <= row["mia_auc"] <= row["mia_auc_ci"][1]
    original = result["original"]
    assert original["gap_points"] >= 5 and original["mia_auc"] > 0.5 and original["mia_auc_retain"] > 0.5
    assert original["mia_auc_ci"][0] <= original["mia_auc"] <= original["mia_auc_ci"][1]
    for exact in ("retrain", "sisa"):  # scored against their own procedure at other seeds, never against themselves
        assert rows[exact]["kl_to_oracle"] > 0 and rows[exact]["l2_to_oracle"] > 0
    for row in rows.values():  # the old key names stay for one release, with the same numbers
        assert row["score"] == row["neurips2023_score"] and row["score_at_chance"] == row["neurips2023_forgetting_quality_null_mean"]
        assert row["neurips2023_score_null_p025"] <= row["neurips2023_score_null_mean"] <= row["neurips2023_score_null_p975"]
    assert rows["sisa"]["details"]["replay_equals_same_seed_retrain"]  # and still exact: equal to its same-seed retrain
    assert all(0.5 <= r["ulira_balanced_accuracy"] <= 1 for r in rows.values())
    assert "U-LiRA" in results.format_table(result)
    assert rows["sisa"]["oracle"] == "sisa_retrain" and rows["dp_nothing"]["oracle"] == "dp_retrain"
    assert rows["finetune"]["oracle"] == "retrain"
    assert rows["dp_nothing"]["speedup"] is None and rows["dp_nothing"]["details"]["certificate_vacuous"]
    assert rows["amnesiac_sample"]["storage_bytes"] < rows["amnesiac_batch"]["storage_bytes"]
    fractions = {(p["fraction"], p["method"]) for p in result["curve"]}
    assert {(0.05, m) for m in METHODS if m != "dp_nothing"} == fractions  # certified rows do no work to plot
    out = tmp_path / "cmp"
    for name in ("table.csv", "table.parquet", "baselines.json", "forget_vs_test_accuracy.png", "time_vs_quality.png",
                 "storage_vs_quality.png", "deletion_rate_curve.png"):
        assert (out / name).is_file(), name

    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(experiments, "tags.`dpsisa.kind` = 'baselines'")
    assert parent.info.run_id == result["mlflow_run_id"]
    children = client.search_runs(experiments, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["dpsisa.method"] for c in children) == sorted(METHODS)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"table.csv", "table.parquet", "deletion_rate_curve.png", "time_vs_quality.png"} <= artifacts
    by_method = {c.data.tags["dpsisa.method"]: c for c in children}
    assert by_method["finetune"].data.metrics["forget_accuracy"] == pytest.approx(rows["finetune"]["forget_accuracy"])


@pytest.mark.slow
def test_exact_rows_score_inside_the_permutation_null_band_of_independently_seeded_oracles(ray_2cpu, tmp_path, capsys):
    # K=8: with fewer models per side a group compared with itself still sits inside the band (at K ≤ 6 a
    # quarter or more of the relabellings pair every model with its twin, scoring 1 like the self-comparison)
    cli.main(["baselines", CONFIG, "--forget", "10", "--k", "8", "--methods", "retrain,sisa", "--out-dir", "exact",
              "--json", "--quiet"])
    result = json.loads(capsys.readouterr().out)
    rows = {r["method"]: r for r in result["rows"]}
    for name, row in rows.items():
        band = (row["neurips2023_score_null_p025"], row["neurips2023_score_null_p975"])
        assert band[0] <= row["neurips2023_score"] <= band[1], f"{name}: score {row['neurips2023_score']} outside {band}"
        assert row["kl_to_oracle"] > 0 and row["l2_to_oracle"] > 0  # another seed's retraining, not the run itself
    assert not set(result["seeds"]) & set(result["oracle_seeds"]) and len(result["oracle_seeds"]) == 8
    assert rows["sisa"]["oracle"] == "sisa_retrain" and rows["sisa"]["details"]["replay_equals_same_seed_retrain"]
    assert "NeurIPS-2023" in result["neurips2023_score"]["definition"] and result["deprecated_keys"]["rows.score"]


@pytest.mark.slow
def test_class_forgetting_oracle_is_near_zero_on_the_class_and_rows_say_how_close_methods_get(ray_2cpu, tmp_path, capsys):
    cli.main(["baselines", CONFIG, "--forget-class", "3", "--methods", "finetune,salun", "--k", "1",
              "--out-dir", "cls", "--json", "--quiet"])
    result = json.loads(capsys.readouterr().out)
    rows = {r["method"]: r for r in result["rows"]}
    assert result["forget"]["class"] == 3 and result["forget"]["count"] > 20
    # report 003's finding: retain finetuning barely lowers forget accuracy; SalUn's random labels erase the class
    assert rows["salun"]["forget_accuracy"] < 0.5 <= rows["finetune"]["forget_accuracy"] <= result["original"]["forget_accuracy"]
    assert all(0 <= r["forget_accuracy"] <= 1 for r in rows.values())
    assert result["oracle"]["forget_accuracy"] <= 0.05  # retraining without the class never predicts it


def test_unlearnable_command_prints_accuracy_per_protected_fraction_and_refuses_bad_fractions(capsys):
    cli.main(["unlearnable", CONFIG, "--fractions", "0,0.5,1", "--json", "--quiet"])
    result = json.loads(capsys.readouterr().out)
    assert [r["fraction"] for r in result["rows"]] == [0.0, 0.5, 1.0]
    first, _, last = result["rows"]
    assert first["clean_only_accuracy"] == first["with_unlearnable_accuracy"] and last["clean_only_accuracy"] is None
    assert result["noise_train_accuracy"] > 0.5 and 0 < last["with_unlearnable_accuracy"] <= 1
    for bad, message in (("0,,1", "must be numbers"), ("0.2,20", "must each be in [0, 1]"), ("0.5,0.5", "must not repeat")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["unlearnable", CONFIG, "--fractions", bad, "--quiet"])
        assert exit_info.value.code == 3 and message in capsys.readouterr().err
