"""One writer per run: concurrent forget submissions through the run's coordinator (real Ray,
real Parquet ledger, digits), with and without the coordinator killed mid-request."""
from __future__ import annotations

import contextlib
import threading
import time

import pytest

from pipeline.sisa import coordinator
from pipeline.storage.ledger import ForgetRequestError
from pipeline.storage.rundir import RunDir
from pipeline.verbs import runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(ray_2cpu, tmp_path_factory):
    """A trained digits run (2 shards × 3 slices, partitioned by data subject); MLflow off: the test
    threads share one process. Its coordinator is kept alive (`train --keep-alive`, as a serving
    deployment runs it), so the tests below share one warm coordinator and its shard actors; the
    tests about a coordinator's own life (started over pending requests, closing itself when idle)
    stop it first and warm the run again after (`_cold`). The cold path of every verb, a
    coordinator started and closed per command, is what test_pipeline.py and the golden run take."""
    from pipeline import config as C

    config = C.load("jobs/configs/digits.yaml", ["tracking.enabled=false", "partition.strategy=by_subject"])
    run = RunDir(tmp_path_factory.mktemp("coord") / "run")
    runs.train(config, run, keep_alive=True)
    return run


@contextlib.contextmanager
def _cold(run: RunDir):
    """No coordinator during the block (the next command starts one, which closes when done); the
    run's kept-alive coordinator is back afterwards."""
    runs.stop(run)
    try:
        yield
    finally:
        runs.stop(run)
        with coordinator.Session(run, run.config(), keep_alive=True):
            pass


def _ids_of_shard(run: RunDir, shard: int, count: int, skip: set[int]) -> list[int]:
    table = run.ledger().assignments().to_pandas()
    mine = table[(table["shard"] == shard) & ~table["sample_id"].isin(skip)].sort_values(["slice", "sample_id"])
    return [int(i) for i in mine["sample_id"].iloc[:: max(1, len(mine) // count)].iloc[:count]]


def _forget_concurrently(run: RunDir, batches: list[list[int]], during=None) -> list:
    results: list = [None] * len(batches)

    def one(k: int) -> None:
        try:
            results[k] = runs.forget(run, batches[k])
        except Exception as exc:  # noqa: BLE001 - reported by the assertions below
            results[k] = exc

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(batches))]
    for t in threads:
        t.start()
    if during is not None:
        during()
    for t in threads:
        t.join(timeout=300)
    return results


def _assert_each_applied_once(run: RunDir, batches: list[list[int]], results: list, shard: int) -> None:
    assert not [r for r in results if isinstance(r, Exception)], results
    requests = run.ledger().requests().to_pandas()
    wanted = {i for ids in batches for i in ids}
    rows = requests[requests["sample_id"].isin(wanted)]
    assert len(rows) == len(wanted) and set(rows["status"]) == {"done"}  # one row per id, each done once
    assert rows["request_id"].nunique() == len(batches)
    manifest = run.shard(shard).manifest()
    assert wanted <= set(manifest.forgotten)  # every id is out of the live model
    assert manifest.version == len(manifest.releases) - 1  # one new version per applied batch, no gaps
    versions = sorted({int(v) for v in requests[requests["shard"] == shard]["model_version"]})
    assert versions == list(range(versions[0], versions[-1] + 1)) and versions[-1] == manifest.version
    ids, _, _ = run.shard(shard).load_data(manifest.data)
    assert not wanted & set(ids.tolist())  # the shard's own data copy dropped them too


def test_concurrent_forget_submissions_on_one_shard_are_each_applied_exactly_once(run):
    batches = [[i] for i in _ids_of_shard(run, 0, 4, set())]
    results = _forget_concurrently(run, batches)
    _assert_each_applied_once(run, batches, results, shard=0)
    assert {r.request_id for r in results} == set(run.ledger().requests().to_pandas()["request_id"])
    assert runs.verify(run).exact is True


def test_an_id_already_done_is_refused_with_the_request_that_holds_it(run):
    held = run.ledger().requests().to_pandas().iloc[0]
    with pytest.raises(ForgetRequestError, match=f"{held['sample_id']} \\(request {held['request_id']} done\\)"):
        runs.forget(run, [int(held["sample_id"])])


def test_a_killed_coordinator_is_restarted_and_finishes_the_requests_without_another_command(run, ray_2cpu):
    taken = set(run.ledger().forgotten_ids(status=None))
    batches = [[i] for i in _ids_of_shard(run, 1, 3, taken)]
    config = run.config()
    killed = []

    def kill_while_working() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            handle = coordinator.find(run, config)
            if handle is not None and run.ledger().pending():
                ray_2cpu.kill(handle, no_restart=False)  # Ray restarts it (max_restarts=-1)
                killed.append(sorted(run.ledger().pending()))
                return
            time.sleep(0.05)

    results = _forget_concurrently(run, batches, during=kill_while_working)
    assert killed and killed[0], "the coordinator was never seen working"
    _assert_each_applied_once(run, batches, results, shard=1)
    assert runs.verify(run).exact is True


def test_erasing_a_subject_replays_one_shard_from_its_slice_and_writes_a_receipt(run, capsys):
    import json

    from pipeline import cli

    table = run.ledger().assignments().to_pandas()
    taken = set(run.ledger().forgotten_ids(status=None))
    untouched = table.groupby("subject_id")["sample_id"].apply(lambda ids: not (set(ids) & taken))
    sizes = table.groupby("subject_id").size()
    subject = str(sizes[(sizes >= 2) & untouched].index[0])
    mine = table[table["subject_id"] == subject]
    assert mine["shard"].nunique() == 1 and mine["slice"].nunique() == 1  # by_subject keeps a person together
    shard, slice_ = int(mine["shard"].iloc[0]), int(mine["slice"].iloc[0])
    before = run.shard(shard).manifest().version
    cli.main(["forget", "--run-dir", run.uri, "--subject", subject, "--json", "--quiet"])
    result = json.loads(capsys.readouterr().out)
    assert result["shards_retrained"] == [shard] and result["from_stage"] == {str(shard): slice_}
    receipt = json.loads((run.path / "receipts" / f"{result['request_id']}.json").read_text())
    assert receipt == result["receipt"] and receipt["subjects"] == [subject]
    assert receipt["sample_ids"] == sorted(mine["sample_id"].tolist()) and receipt["verify"] is None
    entry = receipt["shards"][str(shard)]
    assert entry["new_version"] == before + 1 and entry["retired_versions"] == list(range(before + 1))
    manifest = run.shard(shard).manifest()  # by_subject: ε per person, over the releases that saw the person
    assert receipt["privacy"] == {"privacy_unit": "subject", "delta_per_person": 1e-5, "group_bound": None,
                                  "epsilon_per_person": manifest.releases[before]["epsilon_cumulative"]}

    cli.main(["status", "--run-dir", run.uri, "--subject", subject, "--json", "--quiet"])
    where = json.loads(capsys.readouterr().out)
    assert where["erased"] and {x["first_version_without_it"] for x in where["samples"]} == {before + 1}
    assert all(x["versions_that_saw_it"] == list(range(before + 1)) for x in where["samples"])

    for again in (subject, "no-such-person", f"{subject},,x"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["forget", "--run-dir", run.uri, "--subject", again, "--quiet"])
        assert exit_info.value.code == 3
    err = capsys.readouterr().err
    assert result["request_id"] in err and "no-such-person" in err and "empty item" in err

    cli.main(["verify", "--run-dir", run.uri, "--json", "--quiet"])
    assert json.loads(capsys.readouterr().out)["receipts_verified"] >= 1
    receipt = json.loads((run.path / "receipts" / f"{result['request_id']}.json").read_text())
    assert receipt["verify"]["exact"] is True and receipt["verify"]["versions"][str(shard)] == before + 1


def test_requests_pending_when_the_coordinator_starts_are_applied_as_one_batch(run, capsys):
    import json

    from pipeline import cli

    taken = set(run.ledger().forgotten_ids(status=None))
    targets = _ids_of_shard(run, 0, 3, taken)
    before = run.shard(0).manifest().version
    with _cold(run):
        with run.ledger().locked():  # accepted while no coordinator ran (e.g. it died right after accepting them)
            rids = [run.ledger().append_request([i]) for i in targets]
        cli.main(["request", "--run-dir", run.uri, "--id", rids[-1], "--wait", "--json", "--quiet"])
    answer = json.loads(capsys.readouterr().out)
    assert answer["status"] == "done" and answer["receipt"]["request_id"] == rids[-1]
    assert run.shard(0).manifest().version == before + 1  # one replay for the three of them
    batches = {tuple(run.read_json(f"receipts/{rid}.json")["batch"]) for rid in rids}
    assert batches == {tuple(rids)}
    rows = run.ledger().requests().to_pandas()
    assert rows[rows["request_id"].isin(rids)]["status"].tolist() == ["done"] * 3


def test_no_wait_returns_pending_at_once_and_the_idle_coordinator_then_closes_itself(run, capsys):
    import json

    import yaml

    from pipeline import cli

    saved = (run.path / "config.yaml").read_text()
    config = yaml.safe_load(saved)
    config["ray"]["idle_close_s"] = 2.0
    with _cold(run):
        (run.path / "config.yaml").write_text(yaml.safe_dump(config))
        try:
            target = _ids_of_shard(run, 1, 1, set(run.ledger().forgotten_ids(status=None)))[0]
            cli.main(["forget", "--run-dir", run.uri, "--ids", str(target), "--no-wait", "--json", "--quiet"])
            submitted = json.loads(capsys.readouterr().out)
            assert submitted["status"] == "pending" and submitted["ids"] == 1
            deadline = time.monotonic() + 120
            while run.ledger().pending() and time.monotonic() < deadline:  # nobody waits: the coordinator applies it
                time.sleep(0.2)
            assert not run.ledger().pending() and run.exists(f"receipts/{submitted['request_id']}.json")
            while coordinator.find(run, run.config()) is not None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert coordinator.find(run, run.config()) is None  # closed itself, lease and placement group released
        finally:
            (run.path / "config.yaml").write_text(saved)


def _ids_in_slice(run: RunDir, shard: int, slice_: int, count: int) -> list[int]:
    table = run.ledger().assignments().to_pandas()
    taken = set(run.ledger().forgotten_ids(status=None))
    mine = table[(table["shard"] == shard) & (table["slice"] == slice_) & ~table["sample_id"].isin(taken)]
    return [int(i) for i in mine["sample_id"].sort_values().iloc[:count]]


def _done_rows(run: RunDir, request_id: str):
    rows = run.ledger().requests().to_pandas()
    return rows[rows["request_id"] == request_id]


def test_requests_arriving_while_a_shard_replays_join_its_next_replay_and_other_shards_do_not_wait(run):
    first, *later = _ids_in_slice(run, 0, 0, 4)  # slice 0: shard 0 replays every stage
    other = _ids_in_slice(run, 1, run.config().shards.slices - 1, 1)  # shard 1's last slice: one stage
    before = run.shard(0).manifest().version
    results: dict = {}
    waiting = threading.Thread(target=lambda: results.setdefault("first", runs.forget(run, [first])))
    waiting.start()
    deadline = time.monotonic() + 60
    while not run.ledger().pending() and time.monotonic() < deadline:
        time.sleep(0.02)
    submitted = [runs.submit(run, [i]).request_id for i in later + other]
    pending_then = set(run.ledger().pending())
    waiting.join(timeout=300)
    first_rid = results["first"].request_id
    still_replaying = first_rid in pending_then
    deadline = time.monotonic() + 120
    while run.ledger().pending() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert still_replaying, "the first replay ended before the others were submitted: the test proves nothing"
    assert results["first"].versions == {"0": before + 1}
    joined, alone = submitted[:3], submitted[3]
    versions = {int(_done_rows(run, rid)["model_version"].iloc[0]) for rid in joined}
    assert versions == {before + 2}  # the three that arrived during the replay: one more replay, together
    assert run.shard(0).manifest().version == before + 2
    assert run.read_json(f"receipts/{joined[0]}.json")["batch"] == joined
    # shard 1 was idle: its request did not wait for shard 0's replays (a pipeline shared by the shards
    # would have applied it with the three joined ones, in one ledger write: the same applied_at)
    assert _done_rows(run, alone)["applied_at"].max() < min(_done_rows(run, rid)["applied_at"].min() for rid in joined)
    assert all(set(_done_rows(run, rid)["status"]) == {"done"} for rid in [first_rid, *submitted])
    assert runs.verify(run).exact is True


def test_predictions_come_wholly_from_live_versions_and_say_when_a_request_is_pending(run):
    import numpy as np

    x = np.random.default_rng(0).normal(size=(8, *run.model_info()["input_shape"])).astype(np.float32)
    answers: list = []
    stop = threading.Event()

    def serve_loop() -> None:
        while not stop.is_set():
            started = time.monotonic()
            answers.append((started, runs.serve(run, x).to_dict()))

    done: list = []
    with coordinator.Session(run, run.config()):  # a serving deployment keeps the run warm
        server = threading.Thread(target=serve_loop)
        server.start()
        try:
            for shard in (0, 1):
                (target,) = _ids_in_slice(run, shard, 0, 1)
                result = runs.forget(run, [target])
                done.append((time.monotonic(), result))
        finally:
            stop.set()
            server.join(timeout=120)
    summary = [(round(t, 2), a["model_versions"], a["pending_requests"]) for t, a in answers]
    assert len(answers) >= 4, summary
    for finished, result in done:  # after a request is done, no answer comes from a version that saw it
        for started, answer in answers:
            if started > finished:
                for shard, version in result.versions.items():
                    assert answer["model_versions"][int(shard)] >= version
    for shard in (0, 1):  # versions never go back
        seen = [answer["model_versions"][shard] for _, answer in answers]
        assert seen == sorted(seen)
    assert any(answer["pending_requests"] for _, answer in answers), summary  # made while a replay ran: it says so
    probs = np.asarray(answers[-1][1]["probabilities"])
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_one_request_per_subject_recorded_at_once_is_applied_by_one_replay_per_shard(run, capsys):
    import json

    from pipeline import cli

    table = run.ledger().assignments().to_pandas()
    taken = set(run.ledger().forgotten_ids(status=None))
    free = table.groupby("subject_id").filter(lambda rows: not (set(rows["sample_id"]) & taken))
    home = free.groupby("subject_id")["shard"].first()
    by_shard = {0: sorted(home[home == 0].index)[:2], 1: sorted(home[home == 1].index)[:1]}
    chosen = by_shard[0] + by_shard[1]
    before = {s: run.shard(s).manifest().version for s in (0, 1)}
    recorded = len(run.ledger().requests())

    first = run.ledger().subjects_to_ids(chosen[:1])[chosen[0]]
    with coordinator.Session(run, run.config()) as session:  # checked together: all of them or none
        with pytest.raises(ForgetRequestError, match="duplicate ids"):
            session.submit_batch([first, first[:1]])
    for bad in (["--subject", f"{chosen[0]},no-such-person", "--no-wait"], ["--subject", chosen[0]]):
        with pytest.raises(SystemExit) as exit_info:  # an unknown subject; --each without --no-wait
            cli.main(["forget", "--run-dir", run.uri, *bad, "--each", "--quiet"])
        assert exit_info.value.code != 0
    assert len(run.ledger().requests()) == recorded and "--each" in capsys.readouterr().err

    cli.main(["forget", "--run-dir", run.uri, "--subject", ",".join(chosen), "--no-wait", "--each", "--json", "--quiet"])
    submitted = json.loads(capsys.readouterr().out)
    rid = {r["subject"]: r["request_id"] for r in submitted["requests"]}
    assert sorted(rid) == sorted(chosen) and len(set(rid.values())) == 3
    rows = run.ledger().requests().to_pandas()
    assert rows[rows["request_id"].isin(rid.values())]["requested_at"].nunique() == 1  # one durable write
    for request_id in rid.values():
        assert runs.request_status(run, request_id, wait=True).status == "done"
    assert {s: run.shard(s).manifest().version for s in (0, 1)} == {0: before[0] + 1, 1: before[1] + 1}
    for subjects in by_shard.values():  # one replay per shard applied that shard's requests together
        batch = sorted(rid[s] for s in subjects)
        assert all(sorted(run.read_json(f"receipts/{rid[s]}.json")["batch"]) == batch for s in subjects)


def test_a_read_only_ledger_refuses_a_request_in_one_line_and_a_writer_that_meets_one_finishes_once_it_is_writable(run, capsys):
    """An operator error on a local run directory: the ledger folder stops taking new files. A new
    request is refused with one line and exit 4 and records nothing; a request already accepted
    stays durable while the writer cannot mark it, and is done, with its receipt, once the folder is
    writable again, with no further command."""
    from faults import read_only

    from pipeline import cli

    free = _free_subjects(run)
    recorded = run.ledger().requests().to_pandas()
    with read_only(run.path / "ledger"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["forget", "--run-dir", run.uri, "--subject", free[0], "--quiet"])
        assert exit_info.value.code == 4
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "cannot write" in err and "requests.parquet" in err, err
    assert run.ledger().requests().to_pandas().equals(recorded)  # nothing recorded, nothing lost

    versions = {s: run.shard(s).manifest().version for s in (0, 1)}
    rid = runs.submit(run, None, subjects=[free[1]]).request_id
    with read_only(run.path / "ledger"):  # the replay commits its shard; marking the request fails and is retried
        deadline = time.monotonic() + 120
        while {s: run.shard(s).manifest().version for s in (0, 1)} == versions and time.monotonic() < deadline:
            time.sleep(0.2)
        assert {s: run.shard(s).manifest().version for s in (0, 1)} != versions, "the replay did not commit"
        time.sleep(3)
        assert run.ledger().status_of(rid) == "pending"  # recorded, not yet marked: durable
        assert coordinator.find(run, run.config()) is not None  # the writer is alive, backing off
    deadline = time.monotonic() + 120
    while run.ledger().status_of(rid) != "done" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert run.ledger().status_of(rid) == "done" and run.exists(f"receipts/{rid}.json")


def _free_subjects(run: RunDir) -> list[str]:
    table = run.ledger().assignments().to_pandas()
    taken = set(run.ledger().forgotten_ids(status=None))
    free = table.groupby("subject_id").filter(lambda rows: not (set(rows["sample_id"]) & taken))
    return sorted(set(free["subject_id"]))
