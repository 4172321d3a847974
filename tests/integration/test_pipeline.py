"""End to end on real Ray (2 CPUs), real Parquet ledger, real MLflow (sqlite in tmp_path), digits."""
from __future__ import annotations

import hashlib
import json
import logging
import math

import pyarrow.parquet as pq
import pytest
from faults import kill_shard_while_pending

from pipeline import cli
from pipeline.core.checkpoints import ShardStore
from pipeline.storage.ledger import Ledger
from pipeline.storage.rundir import RunDir
from pipeline.verbs import runs
from pipeline.verbs.access import held

pytestmark = pytest.mark.slow


def _snapshot(run_dir) -> dict[str, str]:
    """Content hash of every file in the run (ledger, manifests, checkpoints)."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def trained(ray_2cpu, tmp_path_factory):
    """One digits run (2 shards × 3 slices, DP fc_gn) shared by the tests below, in order."""
    import os

    home = tmp_path_factory.mktemp("home")
    os.environ["DPSISA_HOME"] = str(home)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    from pipeline import config as C

    config = C.load("jobs/configs/digits.yaml")
    run_dir = home / "run"
    summary = runs.train(config, run_dir)
    return run_dir, summary, home


def _pin_env(monkeypatch, home):
    monkeypatch.setenv("DPSISA_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")


def test_train_writes_the_documented_ledger_and_meets_the_privacy_target(trained):
    run_dir, summary, _ = trained
    table = pq.read_table(run_dir / "ledger" / "assignments.parquet")
    assert {"sample_id", "shard", "slice"} <= set(table.column_names)
    assert str(table.schema.field("sample_id").type) == "int64"
    assert table.num_rows == 1038 and len(set(table["sample_id"].to_pylist())) == 1038
    assert set(table["shard"].to_pylist()) == {0, 1} and set(table["slice"].to_pylist()) == {0, 1, 2}
    assert summary["accuracy"] > 0.5 and len(summary["shard_accuracy"]) == 2
    assert all(0.95 * 2.0 <= e <= 2.0 for e in summary["epsilon_spent"])
    assert summary["full_train_seconds"] > 0


def test_forgetting_an_id_in_the_last_slice_replays_only_that_stage_of_its_shard(trained, monkeypatch, capsys):
    run_dir, _, home = trained
    _pin_env(monkeypatch, home)
    ledger = Ledger(run_dir)
    table = ledger.assignments().to_pandas()
    target = int(table[(table["shard"] == 1) & (table["slice"] == 2)]["sample_id"].iloc[0])
    before = _snapshot(run_dir)
    stage_files_before = {s: ShardStore(run_dir, s).manifest().stages for s in (0, 1)}
    cli.main(["forget", "--run-dir", str(run_dir), "--ids", str(target), "--json", "--quiet"])
    result = json.loads(capsys.readouterr().out)
    assert result["shards_retrained"] == [1]
    assert result["stages_replayed"] == result["slices_retrained"] == {"1": 1}  # (the old key, kept one release)
    assert {"request_id", "seconds", "full_train_seconds"} <= result.keys()
    # only the last stage of one of two equal shards: a small share of the training work
    assert 0 < result["work_fraction"] <= 0.3  # ≈ ½ (last of 3 cumulative stages) × ½ (one of two shards)
    assert result["samples_processed"] == pytest.approx(result["work_fraction"] * result["full_train_samples"])
    after = _snapshot(run_dir)
    untouched = [k for k in before if k.startswith("shards/shard_000/")]
    assert untouched and all(after.get(k) == before[k] for k in untouched)  # shard 0 not touched at all
    new_stages = ShardStore(run_dir, 1).manifest().stages
    assert new_stages[:2] == stage_files_before[1][:2] and new_stages[2] != stage_files_before[1][2]
    done = ledger.requests().to_pandas()
    assert done["status"].tolist() == ["done"] and done["model_version"].tolist() == [1]
    assert target in ShardStore(run_dir, 1).manifest().forgotten


def test_verify_proves_the_unlearned_shard_equals_retraining_from_scratch(trained, monkeypatch, capsys):
    run_dir, _, home = trained
    _pin_env(monkeypatch, home)
    cli.main(["verify", "--run-dir", str(run_dir), "--json", "--quiet"])
    result = json.loads(capsys.readouterr().out)
    assert result["exact"] is True and result["shards_checked"] == [1]
    assert result["shards"][0]["l2_to_oracle"] == 0.0 and result["shards"][0]["max_abs_diff"] == 0.0
    report = result["unlearning"]
    assert report["kl_to_oracle"] == 0.0 and report["test_accuracy"] == report["oracle_test_accuracy"]
    assert report["forgotten"] == 1 and 0 <= report["forget_accuracy"] <= 1 and 0 < report["retain_accuracy"] <= 1


@pytest.mark.parametrize("ids", ["99999", "-4", "3,x", "7,7", "", "FORGOTTEN"])
def test_bad_forget_input_exits_nonzero_and_changes_nothing(trained, monkeypatch, capsys, ids):
    run_dir, _, home = trained
    _pin_env(monkeypatch, home)
    if ids == "FORGOTTEN":
        ids = str(Ledger(run_dir).requests()["sample_id"][0].as_py())
    before = _snapshot(run_dir)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["forget", "--run-dir", str(run_dir), "--ids", ids, "--quiet"])
    assert exit_info.value.code == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert "error:" in err and len(err.strip().splitlines()) == 1
    assert _snapshot(run_dir) == before


def test_an_actor_that_crashes_for_good_is_replaced_and_the_waiting_request_completes_without_another_command(
        trained, monkeypatch, tmp_path, caplog):
    import shutil

    import yaml

    run_dir, _, home = trained
    _pin_env(monkeypatch, home)
    copy = tmp_path / "no-restarts"  # a copy of the run whose shard actors may not be restarted
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("coordinator.lease*"))
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["ray"]["max_restarts"] = 0
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    table = Ledger(copy).assignments().to_pandas()
    target = int(table[(table["shard"] == 0) & (table["slice"] == 0)]["sample_id"].iloc[3])
    manifest_before = ShardStore(copy, 0).manifest()
    killer = kill_shard_while_pending(RunDir(copy), 0)  # shard 0's actor dies mid-forget, for good
    caplog.set_level(logging.INFO, logger="pipeline")
    result = runs.forget(copy, [target], timeout_s=300)
    killer.join()
    assert killer.killed.is_set()
    told = [line for line in caplog.messages if "retrying" in line and "shard 0" in line]
    assert told and len(told) == len(set(told))  # the waiting client heard why, once per distinct error
    requests = Ledger(copy).requests().to_pandas()
    assert requests[requests["sample_id"] == target]["status"].tolist() == ["done"]
    assert result.shards_retrained == [0]
    assert ShardStore(copy, 0).manifest().version == manifest_before.version + 1  # one new version, not two
    for _, row in requests[requests["status"] == "done"].iterrows():  # no done row ahead of its shard's commit
        assert ShardStore(copy, int(row["shard"])).manifest().version >= row["model_version"]
    assert not list((copy / "shards" / "shard_000").glob(".*.tmp"))  # (exactness after completion: test_s3_runs)


def test_evaluate_and_status_report_the_documented_keys(trained, monkeypatch, capsys):
    run_dir, _, home = trained
    _pin_env(monkeypatch, home)
    cli.main(["evaluate", "--run-dir", str(run_dir), "--json", "--quiet"])
    metrics = json.loads(capsys.readouterr().out)
    assert {"accuracy", "vote_accuracy", "shard_accuracy", "epsilon_target", "epsilon_spent", "delta"} <= metrics.keys()
    assert len(metrics["epsilon_spent"]) == 2 and metrics["epsilon_target"] == 2.0
    for attack in ("posterior", "loss", "logistic"):
        assert {"accuracy", "advantage", "auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr"} <= metrics["mia"][attack].keys()
        assert 0 <= metrics["mia"][attack]["auc"] <= 1
    # the empirical audit must never claim more leakage than the accountant allows
    assert 0 <= metrics["epsilon_lower_bound"] <= metrics["epsilon_target"]
    assert "mia_forgotten" in metrics
    cli.main(["status", "--run-dir", str(run_dir), "--json", "--quiet"])
    status = json.loads(capsys.readouterr().out)
    assert [s["version"] for s in status["shards"]] == [0, 1]  # one id forgotten so far, from shard 1
    assert status["pending"] == [] and len(status["done"]) == 1
    assert [s["epsilon_cumulative"] > s["epsilon"] for s in status["shards"]] == [False, True]  # a replay is a release
    assert all(s["node"] and s["device"] == "cpu" for s in status["shards"])
    # unit sample (digits.yaml partitions uniformly): a person owning k samples has only the group bound
    sizes = pq.read_table(run_dir / "ledger" / "assignments.parquet").to_pandas().groupby("subject_id").size()
    k, eps = int(sizes.max()), max(s["epsilon_cumulative"] for s in status["shards"])
    bound = status["group_bound"]
    assert status["privacy_unit"] == metrics["privacy_unit"] == "sample" and bound["largest_subject_samples"] == k
    assert bound["epsilon"] == pytest.approx(k * eps) and bound["delta"] == pytest.approx(k * math.exp((k - 1) * eps) * 1e-5)
    assert bound["vacuous"] is True and status["epsilon_per_person"] is None  # digits' ε≈2.4–2.9 with k≥6: no guarantee per person


def test_mlflow_has_one_run_per_job_with_params_metrics_and_artifacts(trained):
    from mlflow.tracking import MlflowClient

    _, _, home = trained
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dpsisa")
    found = client.search_runs([experiment.experiment_id])
    kinds = [r.data.tags["dpsisa.kind"] for r in found]
    assert kinds.count("train") == 1 and kinds.count("forget") >= 2 and "verify" in kinds
    train_run = next(r for r in found if r.data.tags["dpsisa.kind"] == "train")
    assert train_run.data.params["shards.count"] == "2" and train_run.data.params["finetune.strategy"] == "fc_gn"
    assert 0 < train_run.data.metrics["accuracy"] <= 1 and "epsilon_spent_0" in train_run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(train_run.info.run_id)}
    assert {"config.yaml", "recipes.json", "train_summary.json", "ledger"} <= artifacts
    ledger_files = {a.path for a in client.list_artifacts(train_run.info.run_id, "ledger")}
    assert "ledger/assignments.parquet" in ledger_files


def test_keep_alive_leaves_a_warm_coordinator_whose_crashed_shard_is_restarted_by_ray(ray_2cpu, tmp_path, digits_config):
    from pipeline.sisa import coordinator
    from pipeline.storage.rundir import RunDir

    config = digits_config("shards.count=2", "train.epochs=1")
    run = RunDir(tmp_path / "warm")
    runs.train(config, run, keep_alive=True)
    handle = coordinator.find(run, config)
    assert handle is not None
    status = runs.status(run).to_dict()  # as `status --json` prints it
    assert status["coordinator"] == "warm" and all(s["live"] and s["device"] == "cpu" for s in status["shards"])
    shards = ray_2cpu.get(handle.attach.remote())
    pids = [ray_2cpu.get(a.where.remote())["node"] for a in shards]
    assert all(pids)
    # the coordinator keeps the very actors that trained (no second start): they hold the fit's stage records
    assert all(len(ray_2cpu.get(a.progress.remote("fit"))) == config.shards.slices for a in shards)
    runs.forget(run, [int(Ledger(run).assignments()["sample_id"][0].as_py())])
    assert coordinator.find(run, config) is not None  # kept alive: still there, same shard actors
    assert ray_2cpu.get(handle.attach.remote()) == shards
    ray_2cpu.kill(shards[1], no_restart=False)  # a shard actor crashes: Ray restarts it, it reloads from storage
    runs.forget(run, [int(Ledger(run).assignments()["sample_id"][1].as_py())])
    assert runs.verify(run).exact is True
    assert runs.stop(run).actors_stopped == 3  # the coordinator and its 2 shards
    assert coordinator.find(run, config) is None
    with pytest.raises(ValueError):
        ray_2cpu.util.get_placement_group(coordinator.actor_name(run, -1))  # its CPUs are free again


def test_more_shards_than_the_cluster_holds_fails_fast(ray_2cpu, tmp_path, digits_config):
    from pipeline.sisa.cluster import ClusterError

    config = digits_config("shards.count=4", "ray.cpus_per_shard=1")
    with pytest.raises(ClusterError, match="do not fit"):
        runs.train(config, tmp_path / "big")
    assert not (tmp_path / "big" / "ledger").exists()  # refused before partitioning, pretraining or writing shard data


def test_forgotten_ids_are_at_chance_for_the_attack_after_forgetting(trained, monkeypatch):
    run_dir, _, home = trained
    _pin_env(monkeypatch, home)
    ledger = Ledger(run_dir)
    taken = ledger.forgotten_ids(status=None)
    doomed = [int(i) for i in ledger.assignments()["sample_id"].to_numpy() if int(i) not in taken][:60]
    with held(run_dir):  # one coordinator start for the three verbs (as a sweep trial holds it)
        before = runs.evaluate_run(run_dir, probe_ids=doomed)["mia_forgotten"]["posterior"]
        runs.forget(run_dir, doomed)
        after = runs.evaluate_run(run_dir)["mia_forgotten"]["posterior"]
    assert after["n_members"] == len(doomed) + len(taken)  # these 60 and those forgotten earlier in this module
    low, high = after["accuracy_ci"]
    assert low <= 0.5 + 1e-9, f"forgotten ids still distinguishable: {after}"
    assert before["n_members"] == 60 and 0 <= before["auc"] <= 1


def test_a_tampered_stage_file_is_refused_with_one_line_naming_it_and_exit_3(trained, monkeypatch, capsys, tmp_path):
    import shutil

    run_dir, _, home = trained
    _pin_env(monkeypatch, home)
    copy = tmp_path / "tampered"
    shutil.copytree(run_dir, copy)
    store = ShardStore(copy, 0)
    stage = store.dir / store.manifest().stages[-1]["file"]
    data = bytearray(stage.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stage.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", "--run-dir", str(copy), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 3 and len(err.splitlines()) == 1
    assert "failed its integrity check" in err and stage.name in err


def test_predict_serves_the_live_ensemble_from_npy_input_raw_or_normalised(trained, monkeypatch, capsys, tmp_path):
    import numpy as np
    from sklearn.datasets import load_digits

    from pipeline.data import datasets

    run_dir, _, home = trained
    _pin_env(monkeypatch, home)
    with held(run_dir):  # one coordinator start serves the five predicts below
        raw = load_digits().images[:12].astype(np.uint8)  # 0..16 grey levels, as scikit-learn ships them
        normalised = datasets.normalise("digits", raw)
        np.save(tmp_path / "raw.npy", raw)
        np.save(tmp_path / "x.npy", normalised)
        cli.main(["predict", "--run-dir", str(run_dir), "--input", str(tmp_path / "x.npy"), "--json", "--quiet"])
        served = json.loads(capsys.readouterr().out)
        probs = np.asarray(served["probabilities"])
        assert probs.shape == (12, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
        assert served["predictions"] == probs.argmax(axis=1).tolist()
        live = [ShardStore(run_dir, s).manifest().version for s in range(2)]
        assert served["model_versions"] == live and served["pending_requests"] == []
        assert np.allclose(probs, runs.predict(run_dir, {"x": normalised})["x"], atol=1e-6)
        cli.main(["predict", "--run-dir", str(run_dir), "--input", str(tmp_path / "raw.npy"), "--json", "--quiet"])
        assert np.allclose(json.loads(capsys.readouterr().out)["probabilities"], probs, atol=1e-6)
        np.save(tmp_path / "bad.npy", normalised[:, 0])  # (N, 8, 8): the channel axis is missing
        for bad in ("bad.npy", "missing.npy"):
            with pytest.raises(SystemExit) as exit_info:
                cli.main(["predict", "--run-dir", str(run_dir), "--input", str(tmp_path / bad), "--quiet"])
            err = capsys.readouterr().err.strip()
            assert exit_info.value.code == 3 and len(err.splitlines()) == 1 and "--input" in err
