"""The run verbs' typed results: frozen, and their JSON keys are the documented ones (docs/cli.md)."""
from __future__ import annotations

import dataclasses

import pytest

from pipeline.sisa.results import ShardStatus
from pipeline.verbs.results import Predictions, RunStatus, Stopped, Submission, SubmittedRequest, Verification


def test_a_submission_prints_one_request_or_one_per_subject_with_the_documented_keys():
    one = Submission(run_dir="runs/r", ids=3, request_id="rq1", subjects=("alice",))
    assert one.to_dict() == {"run_dir": "runs/r", "request_id": "rq1", "status": "pending", "ids": 3, "subjects": ["alice"]}
    each = Submission(run_dir="runs/r", ids=5, requests=(SubmittedRequest("rq1", "alice", 2), SubmittedRequest("rq2", "bob", 3)))
    assert each.to_dict() == {"run_dir": "runs/r", "status": "pending", "ids": 5,
                              "requests": [{"request_id": "rq1", "subject": "alice", "ids": 2},
                                           {"request_id": "rq2", "subject": "bob", "ids": 3}]}
    assert "2 requests recorded as pending" in each.human() and "subject bob, 3 id(s)" in each.human()


def test_status_prints_the_person_level_privacy_keys_at_the_top_level():
    shard = ShardStatus(shard=0, version=1, forgotten=2, samples=100, epsilon=0.99, epsilon_cumulative=1.5, releases=2,
                        node="n", host="h", device="cpu")
    status = RunStatus(run_dir="runs/r", shards=(shard,), pending=[], applied=[], done=[{"request_id": "rq", "status": "done",
                       "ids": 2}], epsilon_target=1.0, delta=1e-5,
                       privacy={"privacy_unit": "subject", "epsilon_per_person": 1.5, "delta_per_person": 2e-5})
    out = status.to_dict()
    assert list(out) == ["run_dir", "shards", "pending", "applied", "done", "epsilon_target", "delta", "privacy_unit",
                         "epsilon_per_person", "delta_per_person", "coordinator"]
    assert out["shards"][0]["epsilon_cumulative"] == 1.5 and out["coordinator"] == "stopped"
    assert "above the per-release target" in status.human()  # cumulative 1.5 > target 1.0


def test_results_are_frozen_and_predictions_summarise_long_answers():
    stopped = Stopped(run_dir="runs/r", actors_stopped=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stopped.actors_stopped = 0
    answer = Predictions(run_dir="runs/r", predictions=[1] * 25, probabilities=[[0.1, 0.9]] * 25, model_versions=[0, 2],
                         pending_requests=[])
    text = answer.human()
    assert text.count("class 1 (p=0.900)") == Predictions.SHOWN and "5 more" in text and "per class [0, 25]" in text
    verified = Verification(exact=False, shards_checked=[1], receipts_verified=0,
                            shards=[{"shard": 1, "version": 2, "exact": False, "forgotten": 1, "mismatches": ["fc.weight"]}],
                            device="cpu", unlearning={})
    assert verified.human().startswith("NOT EXACT") and "mismatches ['fc.weight']" in verified.human()


def test_a_train_summary_prints_its_keys_in_the_documented_order_and_reads_metrics_by_name():
    from pipeline.verbs.results import Evaluation, TrainSummary

    metrics = {"accuracy": 0.91, "accuracy_ci": [0.89, 0.93], "vote_accuracy": 0.9, "shard_accuracy": [0.88, 0.9],
               "ece": 0.02, "epsilon_target": 2.0, "epsilon_spent": [1.99, 1.98], "epsilon_cumulative": [1.99, 1.98],
               "delta": 1e-5, "model_versions": [0, 0], "test_samples": 360, "public_accuracy": 0.5}
    summary = TrainSummary(run_dir="runs/r", full_train_seconds=12.5, total_seconds=20.0, metrics=metrics,
                           registered_model="dpsisa-r", registered_version=1)
    out = summary.to_dict()
    assert list(out)[:4] == ["run_dir", "full_train_seconds", "total_seconds", "accuracy"]
    assert list(out)[-2:] == ["registered_model", "registered_version"]
    assert summary["accuracy"] == 0.91 and summary.get("lira") is None and dict(summary) == out
    assert "registered_model" not in TrainSummary("runs/r", 1.0, 2.0, metrics).to_dict()  # registration failed: no keys
    assert summary.human().startswith("trained runs/r in 12.5s: accuracy 0.9100") and "public model alone 0.5000" in summary.human()
    evaluation = Evaluation({**metrics, "mia": {"posterior": {"auc": 0.51, "advantage": 0.03}}, "epsilon_lower_bound": 0.0})
    assert evaluation["mia"]["posterior"]["auc"] == 0.51 and "MIA (posterior) members vs non-members" in evaluation.human()


def test_a_forget_result_prints_stages_replayed_and_its_old_name_and_reads_either_back():
    from pipeline.sisa.results import ForgetResult

    result = ForgetResult.of("rq", [3, 5], {1: {"from_stage": 2, "stages_replayed": 1, "version": 4, "seconds": 0.5}},
                             seconds=1.5, batch=["rq"])
    out = result.to_dict()
    assert out["stages_replayed"] == out["slices_retrained"] == {"1": 1}  # the old key stays one release
    assert ForgetResult.from_dict(out) == result
    old = {k: v for k, v in out.items() if k != "stages_replayed"}  # a coordinator of the previous release
    assert ForgetResult.from_dict(old) == result
    assert "stages replayed {'1': 1}" in result.human()
