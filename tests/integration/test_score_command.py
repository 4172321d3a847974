"""`dpsisa score`: K unlearned vs K retrained digits ensembles on real Ray, real ledger, real MLflow."""
from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from pipeline import cli
from pipeline.evaluation.unlearning import bucket_score
from pipeline.storage.ledger import Ledger
from pipeline.verbs import scoring


def test_scoring_requests_that_cannot_work_fail_before_training(digits_config, tmp_path):
    config = digits_config()
    with pytest.raises(scoring.ScoreError, match="--k must be at least 1"):
        scoring.run_score(config, tmp_path / "a", k=0)
    with pytest.raises(scoring.ScoreError, match="--forget-count must be between 1 and 1037"):
        scoring.run_score(config, tmp_path / "b", k=1, forget_count=5000)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("keep me")
    with pytest.raises(scoring.ScoreError, match="not empty"):
        scoring.run_score(config, tmp_path / "c", k=1)
    assert (tmp_path / "c" / "x").read_text() == "keep me"


def test_forget_and_retain_ids_are_seeded_and_disjoint():
    forget, retain = scoring.choose_ids(5000, 20, seed=3)
    assert forget == scoring.choose_ids(5000, 20, seed=3)[0] != scoring.choose_ids(5000, 20, seed=4)[0]
    assert len(forget) == 20 and len(retain) == scoring.RETAIN_SAMPLE and not set(forget) & set(retain.tolist())


@pytest.mark.slow
def test_score_compares_sisa_forgetting_with_real_retraining(ray_2cpu, tmp_path, capsys):
    cli.main(["score", "jobs/configs/digits.yaml", "shards.count=1", "shards.slices=2", "train.epochs=1", "--k", "2",
              "--forget-count", "8", "--out-dir", "score", "--json", "--quiet"])
    result = json.loads(capsys.readouterr().out)
    out = tmp_path / "score"
    forget = result["forget_ids"]
    assert result["k"] == 2 and len(forget) == 8 and result["retain_sample"] == 1038 - 8
    for i in range(2):
        unlearned, retrained = Ledger(out / f"unlearned-{i}"), Ledger(out / f"retrained-{i}")
        assert unlearned.forgotten_ids() == set(forget)  # forgotten through the product's forget path
        trained_on = set(retrained.assignments()["sample_id"].to_pylist())
        assert not trained_on & set(forget) and len(trained_on) == 1038 - 8  # the oracle never saw F
        excluded = json.loads((out / f"retrained-{i}" / "train_summary.json").read_text())["excluded_ids"]
        assert excluded == forget
    for name in ("sisa", "control_no_unlearning"):
        part = result[name]
        ratios = (part["retain_accuracy"] / result["retrained"]["retain_accuracy"]
                  * part["test_accuracy"] / result["retrained"]["test_accuracy"])
        assert part["score"] == pytest.approx(part["forgetting_quality"] * ratios)
        # with K=2 per side every per-example ε is at most log((1 - δ - 1/4) / (1/4)) < 1.1: bucket ≥ 1/4
        assert part["forgetting_quality"] >= bucket_score(part["epsilon_max"]) >= 0.25
        assert 0 < part["forgetting_quality_p_value"] <= 1 and 0 < part["forgetting_quality_null_mean"] <= 1
        assert 0.3 < part["test_accuracy"] <= 1.0 and 0.3 < part["retain_accuracy"] <= 1.0
        ulira = part["ulira"]  # per (model, forget example): K·|F| unlearned vs K·|F| retrained scores
        assert ulira["members"] == ulira["nonmembers"] == 2 * 8 and 0.5 <= ulira["balanced_accuracy"] <= 1
        assert 0 < ulira["p_value"] <= 1 and 0.5 <= ulira["balanced_accuracy_null_mean"] <= 1
    assert result["score"] == result["sisa"]["score"]
    assert json.loads((out / "score.json").read_text())["score"] == result["score"]

    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    (scored,) = client.search_runs(experiments, "tags.`dpsisa.kind` = 'score'")
    assert scored.data.metrics["score"] == pytest.approx(result["score"]) and scored.info.status == "FINISHED"
    # one score run, open while it worked, holds the parent runs of its 2K run directories
    parents = client.search_runs(experiments, f"tags.mlflow.parentRunId = '{scored.info.run_id}'")
    assert sorted(p.info.run_name for p in parents) == ["retrained-0", "retrained-1", "unlearned-0", "unlearned-1"]
    assert all(scored.info.start_time <= p.info.start_time <= p.info.end_time <= scored.info.end_time for p in parents)
    assert scored.info.end_time - scored.info.start_time >= 1000 * (result["total_seconds"] - 1)
