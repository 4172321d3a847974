"""Every ensemble version in the MLflow Model Registry, with its erasure lineage.

After `train` and after forget requests are applied, the driver (never an actor) logs the live
ensemble as an MLflow pyfunc model (models-from-code: `pyfunc.py`, weights read with
`weights_only`, pip requirements given explicitly so nothing is inferred in a subprocess) in
the verb's child run and registers it under the run's registered-model name, moving the alias
`live` to it. Version tags: requests applied, forgotten count, the digest of the ids it trained
on, ε per shard, the subjects erased, and the verify result once `dpsisa verify` has run.

Erasure reaches the registry: once a request is done, every registered version that still holds
a shard version that saw its samples keeps its registry entry and tags (the audit trail), but its
weights are deleted from the artifact store and its `erasure.json` says why, so loading it fails
with that message. The run directory's `mlflow_registry.json` lists what was registered.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Config
from pipeline.core.train import ShardState, predict_proba, with_params
from pipeline.storage.rundir import RunDir

STATE_FILE = "mlflow_registry.json"
EXAMPLE_FILE = "registry/input_example.npy"  # test-set images (never private), written by train
CODE = Path(__file__).with_name("pyfunc.py")
MODELS_CODE = Path(__file__).parent.parent / "core" / "models.py"
ALIAS = "live"
_LOCK = threading.Lock()


def model_name(config: Config, run: RunDir) -> str:
    """`tracking.registered_model`, else one name per run directory (its name + a hash of its URI)."""
    if config.tracking.registered_model:
        return config.tracking.registered_model
    return f"dpsisa-{run.name}-{hashlib.sha256(run.uri.encode()).hexdigest()[:8]}"


def write_input_example(run: RunDir, images: np.ndarray) -> None:
    """A few test (public) images: the registered models' input example."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(images[:4], dtype=np.float32), allow_pickle=False)
    run.write_bytes(EXAMPLE_FILE, buffer.getvalue())


def _state(run: RunDir) -> dict:
    return run.read_json(STATE_FILE) if run.exists(STATE_FILE) else {"name": None, "versions": []}


def live_members(config: Config, run: RunDir, manifests: list | None = None) -> list[torch.nn.Module]:
    """The constituent models of `manifests` (default: each shard's committed version), built in this process."""
    if manifests is None:
        manifests = [run.shard(s).manifest() for s in range(config.shards.count)]
    pretrained = run.pretrained_model(config)
    return [with_params(pretrained, ShardState.from_payload(run.shard(s).load_stage(m, len(m.stages) - 1)).served)
            for s, m in enumerate(manifests)]


def _requirements() -> list[str]:
    import mlflow

    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}"]


def register_live(config: Config, run: RunDir, run_id: str | None, ids_digest: str, requests: list[str]) -> dict | None:
    """Register the live ensemble (unless this exact version is registered already) in MLflow run
    `run_id`; move `live`; delete the weights of versions that saw erased data. Returns
    {"registered_model", "registered_version"} (None when tracking is off)."""
    if not config.tracking.enabled or run_id is None:
        return None
    from mlflow import MlflowClient

    from pipeline.tracking.mlflow_runs import tracking_uri

    name, uri = model_name(config, run), tracking_uri(config)
    with _LOCK, run.file_lock(".registry.lock"):
        state = _state(run)
        manifests = [run.shard(s).manifest() for s in range(config.shards.count)]
        shard_versions = [m.version for m in manifests]
        if state["versions"] and state["versions"][-1]["shard_versions"] == shard_versions and state["name"] == name:
            return {"registered_model": name, "registered_version": state["versions"][-1]["version"]}
        client = MlflowClient(uri, registry_uri=uri)  # explicit: the process-wide registry URI may name another store
        state = {"name": name, "versions": state["versions"] if state["name"] == name else [],
                 "registering": {"run_id": run_id, "shard_versions": shard_versions}}
        run.write_json(STATE_FILE, state)  # the intent first: a crash after registering cannot hide a version
        version, model_id = _log_model(config, run, run_id, name, uri, manifests)
        state = {"name": name, "versions": [*state["versions"], {"version": version, "model_id": model_id,
                                                                 "shard_versions": shard_versions, "erased": False}]}
        client.set_registered_model_alias(name, ALIAS, str(version))
        for key, value in _version_tags(run, manifests, ids_digest, requests).items():
            client.set_model_version_tag(name, str(version), key, value)
        _erase_superseded(client, run, state)
        run.write_json(STATE_FILE, state)
    return {"registered_model": name, "registered_version": version}


def _adopt_unlisted(client, state: dict) -> None:
    """Registered versions the state file does not list (a crash between registering a version and
    writing the file): adopted with the shard versions of the intent that made them, or, when
    nothing says what they hold, with none known (so any erasure retires them)."""
    intent = state.pop("registering", None)
    listed = {int(e["version"]) for e in state["versions"]}
    for found in client.search_model_versions(f"name='{state['name']}'"):
        if int(found.version) in listed:
            continue
        made_here = intent is not None and found.run_id == intent["run_id"]
        source = str(getattr(found, "source", "") or "")
        model_id = getattr(found, "model_id", None) or (source.split("/", 1)[1] if source.startswith("models:/m-") else None)
        state["versions"].append({"version": int(found.version), "model_id": model_id,
                                  "shard_versions": intent["shard_versions"] if made_here else None,
                                  "erased": found.tags.get("dpsisa.erased") == "true"})
    state["versions"].sort(key=lambda e: e["version"])


def _log_model(config: Config, run: RunDir, run_id: str, name: str, uri: str, manifests: list) -> tuple[int, str]:
    """Log the ensemble of `manifests` as a pyfunc model in `run_id` and register it: (version, model id)."""
    import mlflow
    from mlflow.models import infer_signature

    members = live_members(config, run, manifests)
    info = run.model_info()
    example = np.load(io.BytesIO(run.read_bytes(EXAMPLE_FILE)), allow_pickle=False)
    with torch.no_grad():
        probs = np.stack([predict_proba(m, torch.from_numpy(example)).numpy() for m in members]).mean(0)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights"
        weights.mkdir()
        for s, model in enumerate(members):
            torch.save(model.state_dict(), weights / f"shard_{s:03d}.pt")
        meta, erasure = Path(tmp) / "ensemble.json", Path(tmp) / "erasure.json"
        meta.write_text(json.dumps({"model": config.model.name, "width": config.model.width, "seed": config.seed,
                                    "input_shape": info["input_shape"], "num_classes": info["num_classes"],
                                    "shards": len(members), "shard_versions": [m.version for m in manifests]}))
        erasure.write_text(json.dumps({"erased": False}))
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        with mlflow.start_run(run_id=run_id), quiet_registration():
            logged = mlflow.pyfunc.log_model(
                name="ensemble", python_model=str(CODE), code_paths=[str(MODELS_CODE)],
                artifacts={"weights": str(weights), "ensemble": str(meta), "erasure": str(erasure)},
                signature=infer_signature(example, probs), input_example=example,
                pip_requirements=_requirements(), registered_model_name=name)
    return int(logged.registered_model_version), logged.model_id


# What MLflow prints on every registration, none of it news to our users: it advises type hints on
# `predict` (tensors in, tensors out: there are none to add), and announces each registered version
# on stderr, which the verb's own summary already reports.
_ROUTINE = re.compile(r"(Successfully registered model '|Registered model '.*' already exists|Created version ')")


@contextlib.contextmanager
def quiet_registration() -> Iterator[None]:
    """Log a model without MLflow's routine chatter; every other warning and stderr line still shows.
    (MLflow wraps `log_model` in its own `simplefilter("once")`, which outranks an ignore filter set
    outside it, so the type-hint advice is dropped where warnings are shown instead.)"""
    pyfunc_log = logging.getLogger("mlflow.pyfunc")  # "Validating input example against model signature"
    level, shown, captured = pyfunc_log.level, warnings.showwarning, io.StringIO()

    def show(message, category, filename, lineno, file=None, line=None):
        if "type hints" not in str(message):
            shown(message, category, filename, lineno, file, line)

    try:
        pyfunc_log.setLevel(logging.WARNING)
        with warnings.catch_warnings(), contextlib.redirect_stderr(captured):
            warnings.showwarning = show
            yield
    finally:
        pyfunc_log.setLevel(level)
        kept = [line for line in captured.getvalue().splitlines() if not _ROUTINE.match(line)]
        if kept:
            print("\n".join(kept), file=sys.stderr, flush=True)


def _version_tags(run: RunDir, manifests: list, ids_digest: str, requests: list[str]) -> dict[str, str]:
    ledger = run.ledger()
    return {"dpsisa.run_dir": run.uri, "dpsisa.shard_versions": json.dumps([m.version for m in manifests]),
            "dpsisa.requests_applied": str(len(ledger.request_ids()) - len(ledger.pending())),
            "dpsisa.forgotten": str(sum(len(m.forgotten) for m in manifests)), "dpsisa.ids_digest": ids_digest,
            "dpsisa.epsilon_per_shard": json.dumps([m.releases[-1].get("epsilon_cumulative") for m in manifests]),
            "dpsisa.requests": ",".join(requests)[:4000], "dpsisa.subjects_erased": _subjects(run, requests),
            **_privacy_tags(run, [m.releases[-1].get("epsilon_cumulative") for m in manifests])}


def _privacy_tags(run: RunDir, epsilons: list[float | None]) -> dict[str, str]:
    """The privacy unit, ε and δ per person of the live version (worst shard), and with unit
    "sample" the group bound for the run's largest subject."""
    person = run.person_privacy(None if not epsilons or None in epsilons else max(epsilons))
    return {"dpsisa.privacy_unit": str(person["privacy_unit"]), "dpsisa.epsilon_per_person": json.dumps(person["epsilon_per_person"]),
            "dpsisa.delta_per_person": json.dumps(person["delta_per_person"]), "dpsisa.group_bound": json.dumps(person["group_bound"])}


def _subjects(run: RunDir, requests: list[str]) -> str:
    rows = run.ledger().requests().to_pandas()
    if "subject_id" not in rows:
        return ""
    return ",".join(sorted(set(rows[rows["request_id"].isin(requests)]["subject_id"].dropna().astype(str))))[:4000]


def _erase_superseded(client, run: RunDir, state: dict) -> None:
    """Delete the weights of every registered version holding a shard version that a done
    request retired (that version saw the erased samples); its registry entry and tags stay."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    _adopt_unlisted(client, state)
    rows = run.ledger().requests().to_pandas()
    done = rows[rows["status"].isin(["applied", "done"])]  # the shards no longer hold these ids
    for entry in state["versions"]:
        if entry["erased"] or done.empty:
            continue
        if entry["shard_versions"] is None:  # what it holds is unknown: retire it with the oldest request
            saw = done
        else:
            saw = done[[int(v) < int(mv) for v, mv in zip(np.asarray(entry["shard_versions"])[done["shard"].to_numpy()],
                                                          done["model_version"].to_numpy())]]
        if saw.empty:
            continue
        erased_by = sorted(set(saw["request_id"]))
        if entry["model_id"]:
            location = client.get_logged_model(entry["model_id"]).artifact_location
        else:  # adopted from the registry: reach its artifacts through the version itself
            location = client.get_model_version_download_uri(state["name"], str(entry["version"]))
        repo = get_artifact_repository(location)
        repo.delete_artifacts("artifacts/weights")
        with tempfile.TemporaryDirectory() as tmp:
            marker = Path(tmp) / "erasure.json"
            now = datetime.now(timezone.utc).isoformat()
            marker.write_text(json.dumps({"erased": True, "requests": erased_by, "erased_at": now}))
            repo.log_artifact(str(marker), "artifacts")
        client.set_model_version_tag(state["name"], str(entry["version"]), "dpsisa.erased", "true")
        client.set_model_version_tag(state["name"], str(entry["version"]), "dpsisa.erased_by", ",".join(erased_by)[:4000])
        entry["erased"] = True


def record_verify(config: Config, run: RunDir, exact: bool) -> None:
    """Tag the live registered version with the verify result."""
    from pipeline.tracking.mlflow_runs import tracking_uri, unreachable

    if not config.tracking.enabled or not run.exists(STATE_FILE) or unreachable(tracking_uri(config)):
        return  # (a server that does not answer: the receipts carry the verify result)
    from mlflow import MlflowClient

    state = _state(run)
    if not state["versions"]:
        return
    shard_versions = [run.shard(s).manifest().version for s in range(config.shards.count)]
    latest = state["versions"][-1]
    if latest["shard_versions"] == shard_versions:
        MlflowClient(tracking_uri(config), registry_uri=tracking_uri(config)).set_model_version_tag(
            state["name"], str(latest["version"]), "dpsisa.verify", "exact" if exact else "mismatch")
