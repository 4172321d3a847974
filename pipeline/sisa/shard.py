"""One SISA shard: its constituent model, its slice checkpoints, and forgetting by replay.

`Shard` is plain Python (no Ray): the driver runs it as a Ray actor, tests may run it directly.
Everything it needs comes from the run directory (local or object storage), never from object
refs, so Ray can restart it on another node after a crash: the pretrained model, its recipe, and
its own shard's data file (only its samples, less the ones it has forgotten). It reads the ledger
for its slices and commits checkpoints — and the data file without erased samples — through
`ShardStore`.
"""
from __future__ import annotations

import ctypes
import os
import socket
import sys
import threading
import time
import uuid
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.checkpoints import INITIAL_DATA, Manifest, ShardStore, parameter_l2_distance, sha256_hex
from pipeline.core.privacy import Recipe, release_epsilon, spent_epsilon
from pipeline.storage.ledger import Ledger

if TYPE_CHECKING:  # torch and Opacus load in the shard actor, not in processes that only spawn it
    import torch

    from pipeline.core.models import Classifier
    from pipeline.core.train import ShardState

SAMPLED_ACCURACY_IDS = 256  # progress accuracy: the first ids of slice 0 (trained on at every stage)


class Shard:
    def __init__(self, run_dir: str, shard: int, config_dict: dict, recipe_dict: dict, threads: int = 1,
                 log_progress: bool = True, pretrained: Classifier | None = None):
        import torch

        from pipeline.config import from_dict
        from pipeline.core.finetune import plan_for
        from pipeline.core.train import ShardTrainer, resolve_device
        from pipeline.storage.rundir import RunDir

        torch.set_num_threads(threads)
        self.run = RunDir(run_dir)
        self.shard = shard
        self.config = from_dict(config_dict)
        self.recipe = Recipe.from_dict(recipe_dict)
        self.ledger, self.store = Ledger(self.run), ShardStore(self.run, shard)
        self._set_data(*self.store.load_data(self.store.manifest().data if self.store.exists() else None))
        pretrained = pretrained if pretrained is not None else self.run.pretrained_model(self.config)
        plan = plan_for(pretrained, self.config.finetune.strategy, self.config.finetune.conv_fraction)
        self.device = resolve_device(self.config.train.device)
        if self.device.type == "cuda":  # bitwise replay on GPUs needs deterministic kernels (checked on an H100)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.trainer = ShardTrainer(pretrained, plan, self.recipe, self.config.seed, shard, self.device,
                                    ema=self.config.finetune.ema, augmult=self.config.finetune.augmult)
        self.log_progress = log_progress
        self._model: tuple[int, Classifier] | None = None
        # per-stage progress of the running (or last) fit/forget; `progress` reads it from another thread
        self._progress: list[dict] = []
        self._progress_lock = threading.Lock()
        self._subject_of: tuple[np.ndarray, np.ndarray] | None = None  # (sorted ids, their subjects) of this shard

    def _set_data(self, ids: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """This shard's samples only, sorted by id (rows are looked up by id)."""
        order = np.argsort(ids, kind="stable")
        self.ids, self.x, self.y = ids[order], x[order], y[order]

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        rows = np.searchsorted(self.ids, ids)
        if len(ids) and (rows.max() >= len(self.ids) or not np.array_equal(self.ids[rows], ids)):
            raise RuntimeError(f"shard {self.shard}'s data file lacks ids the ledger assigns to it; retrain the run.")
        return rows

    def where(self) -> dict:
        """The node and device this actor runs on (recorded with every release, shown by status)."""
        return {"node": _node_id(), "host": socket.gethostname(), "device": str(self.device)}

    def _log(self, message: str) -> None:
        if self.log_progress:
            print(f"[shard {self.shard}] {message}", file=sys.stderr, flush=True)  # stdout is for --json

    def _slices(self, exclude: set[int]) -> list[np.ndarray]:
        return self.ledger.shard_slices(self.shard, exclude)

    def _data(self, slices: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(self.x[rows], self.y[rows]) for rows in map(self._rows, slices)]

    def _subjects(self, slices: list[np.ndarray]) -> list[np.ndarray] | None:
        """The subject of each id of each slice (from the ledger), for privacy unit "subject"; else None."""
        if self.recipe.unit != "subject":
            return None
        if self._subject_of is None:
            table = self.ledger.assignments()
            if "subject_id" not in table.column_names:
                raise RuntimeError("privacy unit 'subject' but the ledger has no subject_id column; retrain the run.")
            mine = table["shard"].to_numpy() == self.shard
            ids, owners = table["sample_id"].to_numpy()[mine], table["subject_id"].to_numpy(zero_copy_only=False)[mine]
            order = np.argsort(ids, kind="stable")
            self._subject_of = (ids[order], owners[order])
        ids, owners = self._subject_of
        return [owners[np.searchsorted(ids, s)] for s in slices]

    def _payload(self, stage: int, state: ShardState, slices: list[np.ndarray], version: int) -> dict:
        from pipeline.core.train import ids_digest
        seen = np.concatenate(slices[: stage + 1])
        return {**state.payload(), "stage": stage, "version": version,
                "ids_digest": ids_digest(seen), "samples": int(len(seen)), "seed": self.config.seed,
                "recipe": self.recipe.to_dict()}

    def _train(self, slices, start: int, state: ShardState | None, version: int, job: str, writer: str = "") -> list[dict]:
        """Train stages start.. and write each stage file (not yet live); returns manifest entries.
        Each finished stage also adds a progress record for `job` (see `progress`)."""
        entries: list[dict] = []
        total = len(slices)
        started = time.perf_counter()
        with self._progress_lock:
            self._progress = []

        def on_stage(j: int, s: ShardState) -> None:
            entries.append({**self.store.write_stage(j, version, self._payload(j, s, slices, version), writer), "draw": version})
            record = self._stage_record(job, j, s, slices[0], time.perf_counter() - started)
            with self._progress_lock:
                self._progress.append(record)
            self._log(f"stage {j + 1}/{total} done ({int(sum(len(x) for x in slices[: j + 1]))} samples, "
                      f"loss {_short(record['loss'])}, sampled accuracy {_short(record['accuracy_sampled'])})")

        # a replay (version v) draws fresh sampling and noise for the stages it retrains, recorded
        # per stage in the manifest: consecutive releases never share noise, and verify re-draws the same
        self.trainer.train(self._data(slices), start, state, on_stage, draws=[version] * len(slices),
                           subjects=self._subjects(slices))
        _release_memory()
        return entries

    def _stage_record(self, job: str, stage: int, state: ShardState, first_slice: np.ndarray, seconds: float) -> dict:
        """What a finished stage reports: its mean training loss, accuracy on a fixed set of the
        shard's own ids (no generator is touched: replays stay bit-exact) and ε through this stage."""
        from pipeline.core.train import predict_proba
        rows = self._rows(first_slice[:SAMPLED_ACCURACY_IDS])
        predicted = predict_proba(self.trainer.model(state), self._inputs(self.x[rows])).argmax(1).cpu().numpy()
        return {"job": job, "stage": stage, "loss": self.trainer.last_loss,
                "accuracy_sampled": float((predicted == self.y[rows]).mean()) if len(rows) else None,
                "epsilon": self._epsilon_through_stage(stage), "seconds": seconds}

    def _epsilon_through_stage(self, stage: int) -> float | None:
        """ε a sample of slice 0 has spent after stages 0..stage of one release (None without DP)."""
        r = self.recipe
        if not r.private:
            return None
        if stage == len(r.stages) - 1:
            return r.epsilon_spent  # computed at train time over all stages
        history = tuple((r.noise_multiplier, s.sample_rate, s.steps) for s in r.stages[: stage + 1])
        return spent_epsilon(history, r.delta, r.accountant)  # memoised in core.privacy

    def progress(self, job: str) -> list[dict]:
        """Progress records of `job` ("fit" or a forget request id) so far; the driver polls this
        while `fit`/`forget` runs (the actor runs it in a separate concurrency group)."""
        with self._progress_lock:
            return [dict(r) for r in self._progress if r["job"] == job]

    def fit(self) -> dict:
        """Train every stage from the pretrained model; version 0."""
        start = time.perf_counter()
        slices = self._slices(set())
        entries = self._train(slices, 0, None, 0, "fit")
        seconds = time.perf_counter() - start
        release = {"version": 0, "request_id": None, "from_stage": 0, "seconds": seconds,
                   "epsilon": self.recipe.epsilon_spent, "epsilon_cumulative": self.recipe.epsilon_spent, **self.where()}
        data = {"file": INITIAL_DATA, "sha256": sha256_hex(self.store.storage.read_bytes(INITIAL_DATA)), "samples": len(self.ids)}
        self.store.commit(None, Manifest(self.shard, 0, entries, [], [release], data))
        return {"shard": self.shard, "seconds": seconds, "epsilon": self.recipe.epsilon_spent, "progress": self.progress("fit")}

    def _state(self, manifest: Manifest, stage: int) -> ShardState:
        from pipeline.core.train import ShardState
        payload = self.store.load_stage(manifest, stage)
        return ShardState.from_payload(payload)

    def forget(self, request_id: str, ids: list[int]) -> dict:
        """Replay from the last stage that never saw `ids`; commit a new version atomically.
        Idempotent: a request already applied (crash after commit) is not retrained."""
        start = time.perf_counter()
        manifest, tag = self.store.manifest_tagged()  # the commit below is fenced on this tag
        if set(ids) <= set(manifest.forgotten):  # applied before (a crash, or a restarted coordinator): report that replay
            release = manifest.release_without(ids)
            first = None if release is None else release["from_stage"]
            return {"shard": self.shard, "version": manifest.version if release is None else release["version"],
                    "from_stage": first, "stages_replayed": 0 if first is None else len(manifest.stages) - first,
                    "seconds": 0.0, "already_applied": True, "progress": []}
        forgotten = sorted(set(manifest.forgotten) | set(ids))
        all_slices = self._slices(set())
        fresh = np.setdiff1d(np.asarray(ids, np.int64), np.asarray(manifest.forgotten, np.int64))  # a retried batch
        first = min(r for r, s in enumerate(all_slices) if np.isin(fresh, s).any())
        slices = self._slices(set(forgotten))
        version = manifest.version + 1
        state = self._state(manifest, first - 1) if first > 0 else None
        self._log(f"forget {len(ids)} id(s): replaying stages {first}..{len(slices) - 1} as version {version}")
        writer = uuid.uuid4().hex[:8]  # fresh file names: a second writer of this version never touches ours
        entries = self._train(slices, first, state, version, request_id, writer)
        seconds = time.perf_counter() - start
        replays = [r["from_stage"] for r in manifest.releases[1:]] + [first]
        release = {"version": version, "request_id": request_id, "ids": fresh.tolist(), "from_stage": first, "seconds": seconds,
                   "epsilon": self.recipe.epsilon_spent, "epsilon_cumulative": release_epsilon(self.recipe, replays),
                   **self.where()}
        keep = ~np.isin(self.ids, np.asarray(forgotten, np.int64))  # our data copy drops the erased samples too
        data = self.store.write_data(version, self.ids[keep], self.x[keep], self.y[keep], writer)
        new = Manifest(self.shard, version, manifest.stages[:first] + entries, forgotten, manifest.releases + [release], data)
        self.store.commit(manifest, new, expected=tag)
        self._set_data(self.ids[keep], self.x[keep], self.y[keep])
        return {"shard": self.shard, "version": version, "from_stage": first, "stages_replayed": len(slices) - first,
                "seconds": time.perf_counter() - start, "replay_seconds": seconds, "already_applied": False,
                "progress": self.progress(request_id)}

    def model(self) -> Classifier:
        manifest = self.store.manifest()
        if self._model is None or self._model[0] != manifest.version:
            self._model = (manifest.version, self.trainer.model(self._state(manifest, len(manifest.stages) - 1)))
        return self._model[1]

    def _inputs(self, x: np.ndarray) -> torch.Tensor:
        """Images on the training device (a writable copy: object-store arrays are read-only)."""
        import torch
        return torch.from_numpy(np.array(x, dtype=np.float32)).to(self.trainer.device)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Softmax outputs of the live version (re-read after every forget)."""
        return self.predict(x)["probs"]

    def predict(self, x: np.ndarray) -> dict:
        """Softmax outputs and the version that made them, in one call: it runs in the actor's
        default group, after a replay in progress commits, so a prediction comes wholly from one
        version and never from one that a committed forget retired."""
        from pipeline.core.train import predict_proba
        model = self.model()
        return {"version": self._model[0], "probs": predict_proba(model, self._inputs(x)).cpu().numpy()}

    def verify(self, x_eval: np.ndarray | None = None) -> dict:
        """Auditor's oracle: retrain from scratch without the forgotten ids (same seeds and recorded
        draws, same recipe) and compare every live stage's parameters bit for bit. With `x_eval`, also
        return the oracle's softmax outputs on it (for output-space distances)."""
        import torch

        from pipeline.core.train import ids_digest, predict_proba
        manifest = self.store.manifest()
        slices = self._slices(set(manifest.forgotten))
        mismatched: list[str] = []
        max_diff = 0.0
        live = None

        def compare(j: int, oracle: ShardState) -> None:
            nonlocal max_diff, live
            live = self._state(manifest, j)
            for kind, tensors, kept in (("", oracle.params, live.params), ("ema ", oracle.ema, live.ema)):  # served EMA too
                for name, tensor in tensors.items():
                    if name not in kept or not torch.equal(tensor, kept[name]):
                        mismatched.append(f"stage {j}: {kind}{name}")
                        if name in kept:
                            max_diff = max(max_diff, float((tensor - kept[name]).abs().max()))
            if ids_digest(np.concatenate(slices[: j + 1])) != manifest.stages[j]["ids_digest"]:
                mismatched.append(f"stage {j}: ids seen")

        oracle = self.trainer.train(self._data(slices), 0, None, compare, draws=manifest.draws,  # leaves `live` at the last stage
                                    subjects=self._subjects(slices))
        l2 = parameter_l2_distance({n: t.numpy() for n, t in oracle.params.items()},
                                   {n: t.numpy() for n, t in live.params.items()})
        result = {"shard": self.shard, "exact": not mismatched, "mismatches": mismatched[:20], "max_abs_diff": max_diff,
                  "l2_to_oracle": l2, "version": manifest.version, "forgotten": len(manifest.forgotten)}
        if x_eval is not None:
            result["oracle_probs"] = predict_proba(self.trainer.model(oracle), self._inputs(x_eval)).cpu().numpy()
        _release_memory()
        return result

    def status(self) -> dict:
        m = self.store.manifest()
        return {"shard": self.shard, "version": m.version, "forgotten": len(m.forgotten),
                "samples": m.stages[-1]["samples"], "epsilon": m.releases[-1]["epsilon"],
                "epsilon_cumulative": m.releases[-1]["epsilon_cumulative"], "releases": m.releases, **self.where()}


def _release_memory() -> None:
    """Give the C heap's free memory back to the OS after a job: glibc keeps what training freed
    (about 1 GB per actor on Fashion-MNIST), and S idle actors would hold S times that."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - no Ray context: a plain process
        return None


def _short(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"
