"""MLflow the way its users expect: one parent run per run directory, a child run per verb with its
real start and end, live per-shard stage metrics with steps, the data set as a run input.
Real Ray (2 CPUs), real sqlite MLflow store in a tmp dir, digits."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline.core.train import ids_digest
from pipeline.sisa.driver import PROGRESS_GROUP, Ensemble
from pipeline.storage.ledger import Ledger
from pipeline.storage.rundir import RunDir
from pipeline.tracking import groups
from pipeline.tracking import mlflow_runs as tracking
from pipeline.verbs import runs

# the waited forget's own run, then one run per applied batch by the run's coordinator (it registers
# the batch's model version): the waited forget's batch and the two --no-wait requests
KINDS = ["evaluate", "forget", "forget", "forget", "forget", "train", "verify"]


@pytest.fixture(scope="module")
def session(ray_2cpu, tmp_path_factory):
    """One digits run (2 shards × 3 slices, DP): train, forget two ids of shard 1's last slice, evaluate, verify.
    (Two: evaluate's attack on the forgotten ids needs at least two of them.) Kept-alive actors: the
    verbs after train reuse them, which keeps this module fast."""
    from pipeline import config as C

    home = tmp_path_factory.mktemp("mlflow-home")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    config = C.load("jobs/configs/digits.yaml", [f"tracking.uri={uri}"])
    run_dir = home / "run"
    started = time.perf_counter()
    trained = runs.train(config, run_dir, keep_alive=True)
    train_wall = time.perf_counter() - started
    table = Ledger(run_dir).assignments().to_pandas()
    targets = [int(i) for i in table[(table["shard"] == 1) & (table["slice"] == 2)]["sample_id"].iloc[:2]]
    forgot = runs.forget(run_dir, targets)
    later = [int(i) for i in table[(table["shard"] == 0) & (table["slice"] == 2)]["sample_id"].iloc[:2]]
    no_wait = []
    for i in later:  # forget --no-wait, one after the other: each is done (registered) with no further command
        no_wait.append(runs.submit(run_dir, [i]).request_id)
        deadline = time.monotonic() + 120
        while Ledger(run_dir).status_of(no_wait[-1]) != "done" and time.monotonic() < deadline:
            time.sleep(0.1)
    runs.evaluate_run(run_dir)
    verified = runs.verify(run_dir)
    runs.stop(run_dir)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    found = client.search_runs([experiment.experiment_id])
    return {"run_dir": run_dir, "client": client, "experiment": experiment, "runs": found, "train_wall": train_wall,
            "targets": targets, "forgot": forgot, "verified": verified, "no_wait": no_wait,
            "trained": trained}


def _child(session, kind):
    """The verb's own run (not the coordinator's release runs)."""
    (run,) = [r for r in session["runs"] if r.data.tags["dpsisa.kind"] == kind and "dpsisa.writer" not in r.data.tags]
    return run


@pytest.mark.slow
def test_each_verb_is_a_finished_child_of_the_run_directorys_one_parent_run(session):
    (parent,) = [r for r in session["runs"] if r.data.tags["dpsisa.kind"] == "run"]
    assert json.loads((session["run_dir"] / "mlflow.json").read_text())["run_id"] == parent.info.run_id
    children = [r for r in session["runs"] if r.info.run_id != parent.info.run_id]
    assert sorted(r.data.tags["dpsisa.kind"] for r in children) == KINDS
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert all(r.info.status == "FINISHED" for r in session["runs"])
    assert parent.data.params["shards.count"] == "2"  # the parent carries the config too (table view)
    assert parent.info.start_time <= min(r.info.start_time for r in children)
    assert parent.info.end_time >= max(r.info.end_time for r in children)
    assert session["experiment"].tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND


@pytest.mark.slow
def test_the_train_child_run_lasts_as_long_as_training_did(session):
    train = _child(session, "train").info
    seconds = (train.end_time - train.start_time) / 1000
    assert seconds >= 0.5 * session["train_wall"] and seconds > 2.0


@pytest.mark.slow
def test_shard_stage_metrics_are_logged_live_with_one_step_per_stage(session):
    client, train, forget = session["client"], _child(session, "train"), _child(session, "forget")
    recipes = json.loads((session["run_dir"] / "recipes.json").read_text())
    for shard in (0, 1):
        loss = client.get_metric_history(train.info.run_id, f"shard_{shard}.loss")
        accuracy = client.get_metric_history(train.info.run_id, f"shard_{shard}.accuracy_sampled")
        epsilon = client.get_metric_history(train.info.run_id, f"shard_{shard}.epsilon")
        assert [m.step for m in loss] == [m.step for m in accuracy] == [m.step for m in epsilon] == [0, 1, 2]
        assert all(m.value > 0 for m in loss) and all(0 <= m.value <= 1 for m in accuracy)
        eps = [m.value for m in epsilon]
        assert eps == sorted(eps) and eps[-1] == pytest.approx(recipes[shard]["epsilon_spent"])
        stamps = [m.timestamp for m in loss]  # logged as the stages finished (digits stages take ~1 s)
        assert stamps == sorted(stamps) and train.info.start_time < stamps[0] <= stamps[-1] <= train.info.end_time
    # the forget replayed only stage 2 of shard 1: one step, numbered by the stage replayed
    assert [m.step for m in client.get_metric_history(forget.info.run_id, "shard_1.loss")] == [2]
    assert client.get_metric_history(forget.info.run_id, "shard_0.loss") == []


@pytest.mark.slow
def test_the_ids_each_model_version_trained_on_are_a_data_set_input(session):
    ledger = Ledger(session["run_dir"]).assignments()["sample_id"].to_numpy()
    expected = {"train": ids_digest(ledger), "forget": ids_digest(np.setdiff1d(ledger, session["targets"]))}
    for kind, digest in expected.items():
        (entry,) = _child(session, kind).inputs.dataset_inputs
        assert entry.dataset.name == "digits-private" and entry.dataset.digest == digest[: tracking.DIGEST_CHARS]
        tags = {t.key: t.value for t in entry.tags}
        assert tags["mlflow.data.context"] == "training" and tags["dpsisa.ids_digest"] == digest
    profile = json.loads(_child(session, "train").inputs.dataset_inputs[0].dataset.profile)
    assert profile["features_shape"] == {"sample_id": [len(ledger)]}


@pytest.mark.slow
def test_verify_stays_exact_with_live_progress(session):
    assert session["verified"].exact is True and session["verified"].shards_checked == [0, 1]
    assert session["forgot"].shards_retrained == [1]


@pytest.mark.slow
def test_every_applied_batch_is_released_by_the_coordinator_in_its_own_forget_run_with_its_receipts(session):
    released = sorted((r for r in session["runs"] if r.data.tags.get("dpsisa.writer") == "coordinator"),
                      key=lambda r: r.info.start_time)
    assert [r.data.tags["dpsisa.kind"] for r in released] == ["forget"] * 3
    assert all(r.data.tags["dpsisa.requests"] == "1" for r in released)
    logged = [{a.path for a in session["client"].list_artifacts(r.info.run_id, "receipts")} for r in released]
    assert logged == [{f"receipts/{rid}.json"} for rid in [session["forgot"].request_id, *session["no_wait"]]]
    assert [r.data.metrics["registered_version"] for r in released] == [2, 3, 4]
    assert not (session["run_dir"] / "mlflow_backlog").exists()  # nothing is left for a later command to log
    waited = _child(session, "forget")
    assert {a.path for a in session["client"].list_artifacts(waited.info.run_id, "receipts")} == {
        f"receipts/{session['forgot'].request_id}.json"}


@pytest.mark.slow
def test_every_ensemble_version_is_registered_and_versions_that_saw_erased_data_lose_their_weights(session):
    import mlflow

    from pipeline.tracking import registry

    run = RunDir(session["run_dir"])
    client, name = session["client"], registry.model_name(run.config(), run)
    versions = {int(v.version): v for v in client.search_model_versions(f"name='{name}'")}
    assert sorted(versions) == [1, 2, 3, 4]  # after train, after the forget, after each --no-wait request
    assert session["trained"]["registered_model"] == name and session["trained"]["registered_version"] == 1
    assert session["forgot"].registered_model == name and session["forgot"].registered_version == 2
    assert int(client.get_model_version_by_alias(name, "live").version) == 4
    tags = {k: client.get_model_version(name, str(k)).tags for k in versions}
    assert tags[1]["dpsisa.erased"] == "true" and session["forgot"].request_id in tags[1]["dpsisa.erased_by"]
    for k, rid in ((2, session["no_wait"][0]), (3, session["no_wait"][1])):
        assert tags[k]["dpsisa.erased"] == "true" and tags[k]["dpsisa.erased_by"] == rid
    assert "dpsisa.erased" not in tags[4] and tags[4]["dpsisa.verify"] == "exact"
    assert tags[4]["dpsisa.forgotten"] == "4" and tags[4]["dpsisa.requests"] == session["no_wait"][1]
    assert json.loads(tags[4]["dpsisa.shard_versions"]) == [run.shard(s).manifest().version for s in (0, 1)]
    assert len(json.loads(tags[4]["dpsisa.epsilon_per_shard"])) == 2 and tags[2]["dpsisa.requests"] == session["forgot"].request_id
    with pytest.raises(Exception, match="saw data erased later"):
        mlflow.pyfunc.load_model(f"models:/{name}/1")
    model_id = run.read_json(registry.STATE_FILE)["versions"][0]["model_id"]
    kept = {f.path for f in client.list_logged_model_artifacts(model_id, "artifacts")}
    assert kept == {"artifacts/ensemble.json", "artifacts/erasure.json"}  # the weights are gone, the lineage stays


@pytest.mark.slow
def test_the_live_registered_model_predicts_what_dpsisa_predict_serves(session):
    import mlflow

    from pipeline.data import datasets
    from pipeline.tracking import registry

    run = RunDir(session["run_dir"])
    config = run.config()
    x = datasets.load(config.data).test.x[:16]
    served = runs.serve(run, x).to_dict()
    model = mlflow.pyfunc.load_model(f"models:/{registry.model_name(config, run)}@live")
    probs = model.predict(x)
    assert np.allclose(probs, np.asarray(served["probabilities"]), atol=1e-6)
    assert probs.argmax(axis=1).tolist() == served["predictions"]


def test_a_failing_verb_is_a_failed_child_and_an_old_run_dir_gets_a_parent(digits_config, tmp_path):
    config = digits_config()
    run_dir = tmp_path / "made-before-parent-runs"
    run_dir.mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.verb_run("evaluate", config, run_dir) as run:
            run.log_metrics({"x": 1.0}, step=3)
            raise RuntimeError("boom")
    parent_id = json.loads((run_dir / tracking.PARENT_FILE).read_text())["run_id"]
    with tracking.verb_run("verify", config, run_dir):
        pass
    client = MlflowClient()
    children = client.search_runs([client.get_experiment_by_name("dpsisa").experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_id}'", order_by=["attributes.start_time"])
    assert [(r.data.tags["dpsisa.kind"], r.info.status) for r in children] == [("evaluate", "FAILED"), ("verify", "FINISHED")]
    assert [m.step for m in client.get_metric_history(children[0].info.run_id, "x")] == [3]


@pytest.mark.no_mlflow_store
def test_a_group_run_holds_the_parent_runs_of_the_run_directories_made_inside_it(digits_config, tmp_path):
    config = digits_config()
    with pytest.raises(ValueError), groups.group("score", config, tmp_path / "refused"):
        raise ValueError("refused before any work")  # leaves no run, not even a store
    with groups.group("score", digits_config("tracking.enabled=false"), tmp_path / "off") as off:
        assert groups.log_job("score", digits_config("tracking.enabled=false"), tmp_path, {"score": 1.0}) is None
    assert off.run_id is None and not (tmp_path / "mlflow.db").exists()
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="late"), groups.group("score", config, out) as group:
        for name in ("a", "b"):
            (out / name).mkdir(parents=True)
            with tracking.verb_run("verify", config, out / name):
                time.sleep(0.01)
        assert groups.log_job("score", config, out, {"score": 0.5}) == group.run_id
        raise RuntimeError("late")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("dpsisa").experiment_id
    (run,) = client.search_runs([experiment], "tags.`dpsisa.kind` = 'score'")
    assert run.info.status == "FAILED" and run.data.metrics["score"] == 0.5 and run.info.run_name == "score-out"
    parents = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert sorted(p.info.run_name for p in parents) == ["a", "b"]
    assert all(run.info.start_time <= p.info.start_time <= p.info.end_time <= run.info.end_time for p in parents)
    for parent in parents:  # command → run directory → verb
        (verb,) = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert verb.data.tags["dpsisa.kind"] == "verify"


def test_an_existing_experiment_gets_the_model_development_kind(digits_config):
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri(digits_config()))
    experiment_id = mlflow.create_experiment("older")
    tracking.set_experiment(digits_config("tracking.experiment=older"))
    assert MlflowClient().get_experiment(experiment_id).tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND


@pytest.mark.no_mlflow_store
def test_tracking_off_logs_nothing_and_writes_no_parent_file(digits_config, tmp_path):
    with tracking.verb_run("train", digits_config("tracking.enabled=false"), tmp_path) as run:
        run.log_metrics({"x": 1.0})
        run.log_stage(0, {"stage": 0, "loss": 1.0})
    assert run.run_id is None and not (tmp_path / tracking.PARENT_FILE).exists() and not (tmp_path / "mlflow.db").exists()



def test_the_driver_sees_each_finished_stage_while_the_shard_still_works(ray_2cpu, digits_config, tmp_path):
    class SteppingShard:  # defined here so that Ray ships it by value to the worker
        """Stands in for a Shard actor: finishes stage 0, then waits until the driver has seen it."""

        def __init__(self):
            self.records, self.seen = [], threading.Event()

        def fit(self) -> dict:
            self.records.append({"job": "fit", "stage": 0, "loss": 1.0})
            live = self.seen.wait(timeout=30)
            self.records.append({"job": "fit", "stage": 1, "loss": 0.5})
            return {"seconds": 0.0, "seen_while_working": live, "progress": list(self.records)}

        def progress(self, job: str) -> list[dict]:
            return [r for r in self.records if r["job"] == job]

        def release(self) -> None:
            self.seen.set()

    actor = ray_2cpu.remote(concurrency_groups={PROGRESS_GROUP: 1})(SteppingShard).options(num_cpus=0).remote()
    seen: list[tuple[int, int]] = []

    def on_stage(shard: int, record: dict) -> None:
        seen.append((shard, record["stage"]))
        if record["stage"] == 0:  # tell the working shard that its first stage reached the driver
            actor.release.options(concurrency_group=PROGRESS_GROUP).remote()

    results = Ensemble(RunDir(tmp_path), digits_config(), [actor], None, owned=False).fit(on_stage)
    assert results[0]["seen_while_working"] is True and seen == [(0, 0), (0, 1)]
