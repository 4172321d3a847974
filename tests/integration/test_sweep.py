"""Sweeps: grid expansion and validation (fast, no Ray), plots on a synthetic table (fast), and a
2-trial digits sweep on a 2-CPU Ray cluster, interrupted and resumed, with MLflow parent/child runs (slow)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import own_ray_cluster

from pipeline import sweep
from pipeline.config import ConfigError
from pipeline.evaluation import plots
from pipeline.storage import receipts
from pipeline.storage.rundir import RunDir
from pipeline.tracking import mlflow_runs as tracking

ROOT = Path(__file__).resolve().parents[2]
DIGITS_SWEEP = ROOT / "jobs" / "configs" / "sweep_digits.yaml"


def write_sweep(tmp_path: Path, **spec) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": str(ROOT / "jobs" / "configs" / "digits.yaml"), **spec}))
    return path


def test_grid_expands_to_cartesian_product_times_repeats(tmp_path, monkeypatch):
    monkeypatch.setenv("DPSISA_HOME", str(tmp_path))
    grid = {"privacy.epsilon": [0.5, None], "finetune.strategy": ["fc", "fc_gn", "fc_gn_conv"], "shards.count": [1, 4]}
    spec = sweep.load_spec(write_sweep(tmp_path, name="g", grid=grid, num_samples=2, trial_cpus=1.0))
    points = spec.points()
    assert len(points) == 2 * 3 * 2 * 2
    assert len({tuple(sorted(p.items())) for p in points}) == len(points)
    assert spec.storage_path == (tmp_path / "sweeps" / "g").resolve()
    configs = [sweep.trial_config(spec, p) for p in points]
    assert {c.seed for c in configs} == {0, 1}  # seed = base seed (digits.yaml: 0) + repeat
    assert all(not c.tracking.enabled for c in configs)  # the sweep logs child runs itself
    assert {c.privacy.epsilon for c in configs} == {0.5, None}
    for point, config in zip(points, configs, strict=True):
        bundles = sweep.trial_bundles(spec, point)
        assert len(bundles) == 1 + config.shards.count
        assert sum(b["CPU"] for b in bundles) <= spec.trial_cpus + 1e-9
        assert bundles[1]["CPU"] == config.ray.cpus_per_shard > 0
    assert sweep.max_concurrent_trials(spec, {"CPU": 2.0}) == 2


def test_overrides_apply_to_the_base_config(tmp_path):
    spec = sweep.load_spec(DIGITS_SWEEP, ["train.epochs=0.5", f"tracking.uri=sqlite:///{tmp_path}/m.db"])
    assert spec.base_config.train.epochs == 0.5
    assert spec.base_config.data.name == "digits"
    assert len(spec.points()) >= 4


@pytest.mark.parametrize("grid, named", [
    ({"privacy.epsilonn": [1.0]}, "privacy.epsilonn"),
    ({"shards.countt": [2]}, "shards.countt"),
    ({"finetune.strategy": ["fc", "nope"]}, "finetune.strategy"),
])
def test_unknown_or_invalid_grid_key_is_rejected_with_the_key_named(tmp_path, grid, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        sweep.load_spec(write_sweep(tmp_path, grid=grid))


def test_unknown_sweep_key_is_rejected_with_a_suggestion(tmp_path):
    with pytest.raises(sweep.SweepError, match="'gird'.*did you mean 'grid'"):
        sweep.load_spec(write_sweep(tmp_path, gird={"shards.count": [2]}))


def test_trial_that_cannot_fit_the_cluster_fails_fast(tmp_path):
    spec = sweep.load_spec(write_sweep(tmp_path, grid={"shards.count": [2]}, trial_cpus=4.0))
    with pytest.raises(sweep.SweepError, match="trial needs 4 CPU but the cluster has 2"):
        sweep.max_concurrent_trials(spec, {"CPU": 2.0})


def test_bundled_sweep_configs_are_valid():
    assert len(sweep.load_spec(ROOT / "jobs" / "configs" / "sweep_fmnist.yaml").points()) == 4 * 3 * 3
    for name in ("sweep_digits.yaml", "sweep_fmnist.yaml"):
        header = (ROOT / "jobs" / "configs" / name).read_text().splitlines()[0]
        assert header == f"# ray job submit --working-dir . -- python jobs/sweep.py jobs/configs/{name}"


def test_trial_metrics_read_mia_when_evaluate_reports_it():
    summary = {"accuracy": 0.9, "vote_accuracy": 0.88, "epsilon_spent": [0.7, 0.9], "epsilon_lower_bound": 0.2,
               "mia": {"posterior": {"advantage": 0.03, "auc": 0.52, "tpr_at_1pct_fpr": 0.011}, "loss": {"auc": 0.6}},
               "mia_forgotten": {"posterior": {"advantage": 0.01, "auc": 0.5}}}
    after = sweep.evaluation_metrics(summary, "_after_forget")
    assert after == {"accuracy_after_forget": 0.9, "vote_accuracy_after_forget": 0.88,
                     "epsilon_spent_max_after_forget": 0.9, "epsilon_lower_bound_after_forget": 0.2,
                     "mia_advantage_after_forget": 0.03, "mia_auc_after_forget": 0.52,
                     "mia_tpr_at_1pct_fpr_after_forget": 0.011, "mia_forgotten_advantage_after_forget": 0.01,
                     "mia_forgotten_auc_after_forget": 0.5}
    # before `mia` lands (or without DP) the keys are simply absent
    assert sweep.evaluation_metrics({"accuracy": 0.5, "epsilon_spent": [None, None]}) == {"accuracy": 0.5}
    reported = {**after, "training_iteration": 1, "time_total_s": 3.0, "trial_id": "x", "date": "today"}
    assert sweep.trial_metrics(reported) == after
    forgot = {"seconds": 2.0, "speedup": 5.0, "shards_retrained": [1], "stages_replayed": {"1": 2}}
    assert sweep.forget_metrics(forgot) == {"forget_seconds": 2.0, "forget_speedup": 5.0, "shards_retrained": 1.0,
                                            "stages_replayed": 2.0}
    forgot.update(work_fraction=0.25, samples_processed=512.0)
    assert sweep.forget_metrics(forgot)["forget_work_fraction"] == 0.25
    assert sweep.forget_metrics(forgot)["forget_samples_processed"] == 512.0


def test_a_trial_keeps_one_child_run_when_a_resume_completes_it(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = sweep.load_spec(write_sweep(tmp_path, grid={"shards.count": [2]}), [f"tracking.uri={uri}"])
    parent = sweep.open_parent(spec, resume=False)
    point = spec.points()[0]
    first = parent.log_trial(spec, "abc_00000", point, {}, error="trial failed")
    run_dir = RunDir(sweep.trial_dir(spec, "abc_00000"))
    run_dir.write_config(sweep.trial_config(spec, point))  # what the trial's train wrote
    assert not run_dir.exists(tracking.PARENT_FILE)  # a failed trial's run dir is not adopted
    again = parent.log_trial(spec, "abc_00000", point, {"accuracy": 0.8})
    client = MlflowClient(uri)
    children = client.search_runs([parent.experiment_id], f"tags.mlflow.parentRunId = '{parent.parent_run_id}'")
    assert first == again and len(children) == 1
    child = children[0]
    assert child.info.status == "FINISHED" and "dpsisa.error" not in child.data.tags
    assert child.data.metrics == {"accuracy": 0.8} and child.data.params["shards.count"] == "2"
    assert sweep.open_parent(spec, resume=True).parent_run_id == parent.parent_run_id
    # the finished trial's child run is its run directory's parent: a later verb there nests under it
    assert run_dir.read_json(tracking.PARENT_FILE)["run_id"] == child.info.run_id
    config = run_dir.config()
    assert config.tracking.enabled and config.tracking.uri == uri
    with tracking.verb_run("evaluate", config, run_dir):
        pass
    (verb,) = client.search_runs([parent.experiment_id], f"tags.mlflow.parentRunId = '{child.info.run_id}'")
    assert verb.data.tags["dpsisa.kind"] == "evaluate"  # sweep → trial → verb
    trial = client.get_run(child.info.run_id)
    assert trial.data.tags["mlflow.parentRunId"] == parent.parent_run_id
    assert (trial.info.status, trial.info.end_time) == ("FINISHED", child.info.end_time)  # the trial keeps its times


def synthetic_table() -> pd.DataFrame:
    rows = [{"trial_id": f"t{i}", "shards.count": s, "finetune.strategy": f, "privacy.epsilon": e,
             "accuracy": 0.5 + 0.1 * (e or 3) + (0.05 if f == "fc_gn" else 0), "mia_advantage": 0.01 * (e or 5),
             "forget_speedup": 2.0 * s}
            for i, (s, f, e) in enumerate((s, f, e) for s in (1, 5) for f in ("fc", "fc_gn") for e in (0.5, 1.0, None))]
    return plots.summary_table(rows)


def test_no_dp_is_placed_right_of_the_largest_epsilon():
    where, ticks, labels = plots.epsilon_positions(pd.Series([0.5, 1.0, 1.5, np.inf]))
    assert where[np.inf] == pytest.approx(2.0) and ticks[-1] == where[np.inf]
    assert labels == ["0.5", "1", "1.5", "∞ (no DP)"]


def test_plots_and_best_strategy_from_a_summary_table(tmp_path):
    table = synthetic_table()
    assert table["privacy.epsilon"].isna().sum() == 4  # no DP kept as NaN, sorted last
    best = plots.best_per_cell(table)
    assert len(best) == 2 * 3 and {b["finetune.strategy"] for b in best} == {"fc_gn"}
    assert any(b["privacy.epsilon"] is None for b in best)
    paths = plots.save_all(table, tmp_path / "plots")
    assert [p.name for p in paths] == ["accuracy_vs_epsilon.png", "mia_advantage_vs_epsilon.png",
                                       "forget_speedup_vs_shards.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in paths)
    assert "∞ (no DP)" in plots.format_table(table)


# -- slow: a real sweep ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_2cpu():
    import ray

    own_ray_cluster()  # Tune gets a cluster of its own
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="dpsisa-test-sweep")
    yield
    ray.shutdown()


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_to_one_child_run_per_trial_with_its_table_plots_and_receipts(ray_2cpu, tmp_path):
    """SIGINT the real command once a trial has reported, then --resume: every trial ends with
    exactly one finished child run, the summary holds all of them, the parent carries the table and
    plots, and each trial's forget went through a coordinator. Two trials (the smoke sweep's
    ε ∈ {1, no DP} at fc_gn, one at a time): one finishes before the interrupt, the other after."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [f"tracking.uri={uri}", "tracking.experiment=resume-test"]
    spec = yaml.safe_load(DIGITS_SWEEP.read_text())
    spec.update(base=str(ROOT / "jobs" / "configs" / "digits.yaml"), max_concurrent_trials=1,
                grid={**spec["grid"], "finetune.strategy": ["fc_gn"]})
    two_trials = tmp_path / "sweep_digits.yaml"
    two_trials.write_text(yaml.safe_dump(spec))
    # the command joins this module's cluster by its address (DPSISA_HOME is tmp_path: conftest)
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    # jobs/sweep.py: what `ray job submit -- python jobs/sweep.py SWEEP.yaml` runs as the job's driver
    # (a job's entrypoint is a process on the cluster with RAY_ADDRESS set; the job machinery itself
    # is test_ray_job_submit.py's); `dpsisa sweep` is the same `sweep.main`
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "sweep.py"), str(two_trials), *overrides],
                            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tune_dir = tmp_path / "sweeps" / "sweep_digits" / "tune"
    deadline = time.monotonic() + 600
    while not any(p.stat().st_size for p in tune_dir.glob("*/result.json")):
        assert proc.poll() is None, f"the sweep ended before any trial reported:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no trial reported within 10 minutes"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 4, stderr[-3000:]  # interrupted: unfinished trials, --resume suggested
    assert "rerun with --resume" in stderr

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("resume-test")
    interrupted = client.search_runs([experiment.experiment_id], "tags.dpsisa.kind = 'sweep'")
    assert len(interrupted) == 1 and interrupted[0].info.status == "KILLED"
    done_before = len(client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'"))
    assert done_before == 1

    # a second run of the same sweep is refused; --resume finishes it
    with pytest.raises(sweep.SweepError, match="--resume"):
        sweep.run_sweep(two_trials, overrides)
    result = sweep.run_sweep(two_trials, overrides, resume=True)
    assert result["parent_run_id"] == interrupted[0].info.run_id
    assert not result["errors"] and not result["unfinished"]
    assert Path(result["storage_path"]) == (tmp_path / "sweeps" / "sweep_digits").resolve()
    table = pd.DataFrame(result["table"])
    assert len(table) == 2 and set(table["finetune.strategy"]) == {"fc_gn"} and table["privacy.epsilon"].isna().sum() == 1
    assert table["accuracy"].between(0.3, 1.0).all()  # 10 classes: chance is 0.1
    assert table["accuracy_after_forget"].between(0.3, 1.0).all()
    assert (table["forget_speedup"] > 0).all() and (table["forget_seconds"] > 0).all()
    dp = table[table["privacy.epsilon"].notna()]
    assert (dp["epsilon_spent_max"] <= 1.0 + 1e-6).all() and (dp["epsilon_spent_max"] > 0.5).all()
    assert len(result["best"]) == 2  # one per (shards=2, ε ∈ {1, no DP})

    parent = client.get_run(result["parent_run_id"])
    assert parent.data.tags["dpsisa.kind"] == "sweep" and parent.info.status == "FINISHED"
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    assert len(children) == 2 and {c.data.tags["dpsisa.trial_id"] for c in children} == set(table["trial_id"])
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"accuracy", "vote_accuracy", "accuracy_after_forget", "forget_seconds", "full_train_seconds",
                "forget_speedup"} <= set(child.data.metrics)
        assert child.data.params["tracking.enabled"] == "False" and child.data.params["shards.count"] == "2"
        assert 0 < child.data.metrics["accuracy"] <= 1
        # the trial's child run is its run directory's parent run (later verbs there nest under it)
        assert RunDir(child.data.tags["dpsisa.run_dir"]).read_json(tracking.PARENT_FILE)["run_id"] == child.info.run_id
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "summary.parquet", "accuracy_vs_epsilon.png", "mia_advantage_vs_epsilon.png",
            "forget_speedup_vs_shards.png"} <= artifacts
    # the trials' own jobs did not log runs of their own: only the parent and its children exist
    assert len(client.search_runs([experiment.experiment_id])) == 3
    # one forget engine: each trial's request went through a coordinator (pending → applied → done,
    # with its receipt), not through a second path that marks requests done directly
    for trial_id in table["trial_id"]:
        run = RunDir(tmp_path / "sweeps" / "sweep_digits" / "runs" / trial_id)
        requests = run.ledger().requests().to_pandas()
        assert len(requests) == 5 and (requests["status"] == "done").all() and requests["applied_at"].notna().all()
        assert all(receipts.read(run, rid) is not None for rid in requests["request_id"].unique())

    # --resume of a finished sweep adds no duplicate runs
    again = sweep.run_sweep(two_trials, overrides, resume=True)
    assert again["parent_run_id"] == result["parent_run_id"] and len(again["table"]) == 2
    assert len(client.search_runs([experiment.experiment_id])) == 3
