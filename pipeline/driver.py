"""The driver: starts one ShardActor per shard on Ray, routes forget requests, aggregates.

Ray lives here and in `cluster.py` only. Actors are sized from what the cluster (or a Tune
trial's placement group) holds, placed with one bundle per shard, and — with keep_alive —
detached and named in a fixed namespace so a later job reaches them warm.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pipeline import cluster
from pipeline.checkpoints import CheckpointIntegrityError
from pipeline.config import Config
from pipeline.data.datasets import Data
from pipeline.ledger import Ledger
from pipeline.models import Classifier
from pipeline.shard import Shard

PLACEMENT_TIMEOUT_S = 60
PROGRESS_GROUP = "progress"  # a second concurrency group per actor: `progress` answers while fit/forget runs
PROGRESS_POLL_S = 1.0
OnStage = Callable[[int, dict], None]  # (shard, progress record of one finished stage)


class ShardFailure(RuntimeError):
    """A shard actor died or failed while working; pending work stays recorded."""


@dataclass(frozen=True)
class Resources:
    cpus: float
    gpus: float


RESOURCE_UNITS = 10_000  # Ray keeps resource amounts in fixed point, in units of 1e-4 (ray._raylet.RESOURCE_UNIT_SCALING)


def _units(amount: float) -> int:
    """An amount in Ray's fixed-point units, converted as Ray does (to the nearest unit)."""
    return int(math.floor(amount * RESOURCE_UNITS + 0.5))


def resource_share(total: float, parts: int) -> float:
    """total / parts rounded DOWN to Ray's granularity (1e-4), so that `parts` shares always fit in `total`."""
    return _units(total) // parts / RESOURCE_UNITS


def shard_resources(config: Config, total: dict[str, float]) -> Resources:
    """Per-shard request that lets all S actors live at once on the cluster (fail fast if not).

    Unset (null) requests get an equal share of the cluster, at most 1 CPU / 1 GPU per shard, rounded
    down to Ray's granularity: a layout that fits is never refused by rounding (3 shards on 2 CPUs get
    0.6666 CPU each). Explicit requests that do not fit, and shards too many for a non-zero share, fail."""
    shards = config.shards.count
    cpus_total, gpus_total = total.get("CPU", 0.0), total.get("GPU", 0.0)
    cpus, gpus = config.ray.cpus_per_shard, config.ray.gpus_per_shard
    share_cpus = cpus is None and cpus_total > 0
    share_gpus = gpus is None and gpus_total > 0 and config.train.device != "cpu"
    if cpus is None:
        cpus = min(1.0, resource_share(cpus_total, shards)) if share_cpus else 0.0
    if gpus is None:
        gpus = min(1.0, resource_share(gpus_total, shards)) if share_gpus else 0.0
    for key, shared, share, amount in (("CPU", share_cpus, cpus, cpus_total), ("GPU", share_gpus, gpus, gpus_total)):
        if shared and share == 0:
            raise cluster.ClusterError(
                f"{shards} shards cannot each get a share of the cluster's {key} {amount} (Ray's smallest share is "
                f"{1 / RESOURCE_UNITS:g}); lower shards.count or add nodes."
            )
    if (_units(cpus) * shards > _units(cpus_total) or _units(gpus) * shards > _units(gpus_total)
            or (cpus == 0 and gpus == 0)):
        raise cluster.ClusterError(
            f"{shards} shards × (CPU {cpus}, GPU {gpus}) do not fit the cluster's CPU {cpus_total}, GPU {gpus_total}; "
            "lower shards.count, set ray.cpus_per_shard / ray.gpus_per_shard, or add nodes."
        )
    return Resources(cpus, gpus)


def actor_name(run_dir: Path, shard: int) -> str:
    from pipeline.config import digest

    suffix = "placement" if shard < 0 else f"shard{shard:03d}"
    return f"dpsisa-{digest(str(run_dir.resolve()))}-{suffix}"


class Ensemble:
    """S ShardActors over one run directory."""

    def __init__(self, run_dir: Path, config: Config, actors: list, placement: PlacementGroup | None, detached: bool):
        self.run_dir, self.config, self.actors = Path(run_dir), config, actors
        self.placement, self.detached = placement, detached
        self.ledger = Ledger(run_dir)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def start(cls, run_dir: Path, config: Config, load: Callable[[], tuple[Data, Classifier]], recipes: list[dict],
              keep_alive: bool = False, placement: PlacementGroup | None = None, log: Callable = print) -> Ensemble:
        """Create (or, with keep_alive, reuse) one actor per shard; `load` gives the data and the
        pretrained model and is only called when actors must be created."""
        names = [actor_name(run_dir, s) for s in range(config.shards.count)]
        if keep_alive:
            found = [cluster.named_actor(n, config.ray.namespace) for n in names]
            if all(found):
                log(f"reusing {len(found)} warm shard actors (namespace {config.ray.namespace})")
                return cls(run_dir, config, found, None, True)
            if any(found):  # some died (a crash): release the survivors and their names, then rebuild
                log(f"{found.count(None)} kept-alive shard actor(s) are gone; restarting all {len(found)}")
                cls.stop_detached(run_dir, config)
        own_placement = placement is None
        if own_placement:
            res = shard_resources(config, ray.cluster_resources())
            bundle = {"CPU": res.cpus, **({"GPU": res.gpus} if res.gpus else {})}
            placement = placement_group([bundle] * config.shards.count, strategy="SPREAD",
                                        lifetime="detached" if keep_alive else None,
                                        name=actor_name(run_dir, -1) if keep_alive else "")
            try:
                ray.get(placement.ready(), timeout=PLACEMENT_TIMEOUT_S)
            except GetTimeoutError:
                remove_placement_group(placement)
                raise cluster.ClusterError(
                    f"could not reserve {config.shards.count} × (CPU {res.cpus}, GPU {res.gpus}) within "
                    f"{PLACEMENT_TIMEOUT_S}s; the cluster is busy or too small: free resources or lower shards.count."
                ) from None
        else:  # inside a Tune trial: share the trial's placement group, sized from its bundles
            totals: dict[str, float] = {}
            for spec in placement.bundle_specs[1:] or placement.bundle_specs:
                for key, value in spec.items():
                    totals[key] = totals.get(key, 0.0) + value
            res = shard_resources(config, totals)
        data, pretrained = load()
        x_ref, y_ref, model_ref = ray.put(data.private.x), ray.put(data.private.y), ray.put(pretrained)
        remote = ray.remote(concurrency_groups={PROGRESS_GROUP: 1})(Shard)  # default group: 1 (fit, forget, …)
        actors = []
        for s in range(config.shards.count):
            options = {
                "num_cpus": res.cpus, "num_gpus": res.gpus, "max_concurrency": 1,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    placement, placement_group_bundle_index=s if own_placement else -1),
            }
            if keep_alive:
                options.update(name=names[s], namespace=config.ray.namespace, lifetime="detached")
            actors.append(remote.options(**options).remote(
                str(run_dir), s, config.to_dict(), recipes[s], model_ref, x_ref, y_ref, config.train.threads))
        log(f"started {len(actors)} shard actors (CPU {res.cpus}, GPU {res.gpus} each)")
        return cls(run_dir, config, actors, placement if own_placement else None, keep_alive)

    def shutdown(self) -> None:
        """Stop actors that are not meant to outlive this process."""
        if self.detached:
            return
        for actor in self.actors:
            ray.kill(actor)
        if self.placement is not None:
            remove_placement_group(self.placement)

    @staticmethod
    def stop_detached(run_dir: Path, config: Config, timeout_s: float = 30.0) -> int:
        """Kill a run's kept-alive actors and release their placement group; returns how many.
        Waits until the names are free again, so actors of the same names can be created."""
        names = [actor_name(run_dir, s) for s in range(config.shards.count)]
        alive = [a for a in (cluster.named_actor(n, config.ray.namespace) for n in names) if a is not None]
        for actor in alive:
            ray.kill(actor)
        try:
            remove_placement_group(ray.util.get_placement_group(actor_name(run_dir, -1)))
        except ValueError:
            pass  # no kept-alive placement group for this run
        deadline = time.monotonic() + timeout_s
        while any(cluster.named_actor(n, config.ray.namespace) for n in names) and time.monotonic() < deadline:
            time.sleep(0.2)
        return len(alive)

    # -- fan-out ------------------------------------------------------------------------------
    def _gather(self, refs: dict, what: str, log: Callable | None = None, progress: _Progress | None = None) -> dict:
        """Wait for every ref, reporting progress (and, with `progress`, each shard's finished
        stages while it works); a dead actor becomes a ShardFailure."""
        results, pending, start = {}, dict(refs), time.perf_counter()
        while pending:
            polls = [] if progress is None else progress.ask(set(pending.values()))
            done, _ = ray.wait(list(pending) + polls, num_returns=1, timeout=PROGRESS_POLL_S if progress else None)
            for ref in done:
                if ref not in pending:  # a progress answer
                    progress.answer(ref)
                    continue
                shard = pending.pop(ref)
                try:
                    results[shard] = ray.get(ref)
                except RayActorError as exc:
                    raise ShardFailure(f"shard {shard} actor died during {what}: {exc.__class__.__name__}") from exc
                except ray.exceptions.RayTaskError as exc:
                    if isinstance(exc.cause, CheckpointIntegrityError):  # rerunning cannot help: the user must act
                        raise CheckpointIntegrityError(f"shard {shard}: {exc.cause}") from exc
                    raise ShardFailure(f"shard {shard} failed during {what}: {exc.cause!r}") from exc
                if progress is not None:  # the result carries every record: none is lost between polls
                    progress.report(shard, results[shard].get("progress", []))
                if log is not None:
                    log(f"  {what}: shard {shard} done ({len(results)}/{len(refs)}, {time.perf_counter() - start:.1f}s)")
        return results

    def _progress(self, job: str, on_stage: OnStage | None) -> _Progress | None:
        return None if on_stage is None else _Progress(self.actors, job, on_stage)

    def fit(self, log: Callable = print, on_stage: OnStage | None = None) -> dict[int, dict]:
        """Train every shard; `on_stage(shard, record)` sees each finished stage while training goes on."""
        return self._gather({a.fit.remote(): s for s, a in enumerate(self.actors)}, "train", log,
                            self._progress("fit", on_stage))

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(S, N, C) softmax outputs of every constituent model."""
        ref = ray.put(x)
        results = self._gather({a.predict_proba.remote(ref): s for s, a in enumerate(self.actors)}, "predict")
        return np.stack([results[s] for s in range(len(self.actors))])

    def predict_mean(self, x: np.ndarray) -> np.ndarray:
        """(N, C) mean-softmax output of the ensemble (what is served)."""
        return self.predict_proba(x).mean(axis=0)

    def verify(self, shards: list[int], x_eval: np.ndarray | None = None, log: Callable = print) -> dict[int, dict]:
        ref = None if x_eval is None else ray.put(x_eval)
        return self._gather({self.actors[s].verify.remote(ref): s for s in shards}, "verify", log)

    def status(self) -> dict[int, dict]:
        return self._gather({a.status.remote(): s for s, a in enumerate(self.actors)}, "status")

    # -- forgetting ---------------------------------------------------------------------------
    def _apply(self, request_id: str, ids: list[int], log: Callable, on_stage: OnStage | None = None) -> dict:
        owners = self.ledger.owners(ids)
        results = self._gather({self.actors[s].forget.remote(request_id, owned): s for s, owned in owners.items()},
                               "forget", log, self._progress(request_id, on_stage))
        with self.ledger.locked():
            self.ledger.mark_done(request_id, {s: r["version"] for s, r in results.items()})
        return results

    def complete_request(self, request_id: str, ids: list[int], log: Callable = print,
                         on_stage: OnStage | None = None) -> dict:
        """Finish one request a crash left `pending` (idempotent per shard); its summary."""
        log(f"completing pending forget request {request_id} ({len(ids)} ids)")
        start = time.perf_counter()
        results = self._apply(request_id, ids, log, on_stage)
        return {"request_id": request_id, "ids": len(ids), "completed_pending": True,
                **_forget_summary(results), "seconds": time.perf_counter() - start}

    def complete_pending(self, log: Callable = print) -> dict[str, dict]:
        """Finish every request a crash left `pending`; request id → summary."""
        return {rid: self.complete_request(rid, ids, log) for rid, ids in self.ledger.pending().items()}

    def forget(self, ids: list[int], log: Callable = print, on_stage: OnStage | None = None) -> dict:
        """Validate, record as pending, retrain owners in parallel, mark done. Callers complete
        earlier pending requests first (runs.forget does, and logs each to MLflow); until then
        their ids fail validation as already pending."""
        start = time.perf_counter()
        with self.ledger.locked():
            self.ledger.validate(ids)
            request_id = self.ledger.append_request(ids)
        log(f"forget request {request_id}: {len(ids)} id(s) owned by shard(s) {sorted(self.ledger.owners(ids))}")
        results = self._apply(request_id, ids, log, on_stage)
        return {"request_id": request_id, "ids": len(ids), **_forget_summary(results), "seconds": time.perf_counter() - start}


class _Progress:
    """Asks working shards for their finished stages (at most every PROGRESS_POLL_S per shard, one
    question in flight each) and hands each record to `on_stage` once, in stage order per shard.
    The driver waits on the answers together with the results, so a stage is logged as soon as
    the shard answers. A shard whose poll fails (it died, or a kept-alive actor predates
    `progress`) is asked no more: its final result still reports every stage."""

    def __init__(self, actors: list, job: str, on_stage: OnStage):
        self.actors, self.job, self.on_stage = actors, job, on_stage
        self.reported: set[tuple[int, int]] = set()
        self.in_flight: dict = {}  # poll ref → shard
        self.asked: dict[int, float] = {}  # shard → when last asked
        self.broken: set[int] = set()

    def ask(self, shards: set[int]) -> list:
        """Send due questions; returns every poll ref still unanswered."""
        now, busy = time.monotonic(), set(self.in_flight.values())
        for shard in sorted(shards - busy - self.broken):
            if now - self.asked.get(shard, -math.inf) < PROGRESS_POLL_S:
                continue
            try:
                ref = self.actors[shard].progress.options(concurrency_group=PROGRESS_GROUP).remote(self.job)
            except Exception:  # noqa: BLE001 - an actor without the method or group: no live progress from it
                self.broken.add(shard)
                continue
            self.in_flight[ref], self.asked[shard] = shard, now
        return list(self.in_flight)

    def answer(self, ref) -> None:
        shard = self.in_flight.pop(ref)
        try:
            records = ray.get(ref)
        except ray.exceptions.RayError:
            self.broken.add(shard)
            return
        self.report(shard, records)

    def report(self, shard: int, records: list[dict]) -> None:
        for record in sorted(records, key=lambda r: r["stage"]):
            if record.get("job", self.job) == self.job and (shard, record["stage"]) not in self.reported:
                self.reported.add((shard, record["stage"]))
                self.on_stage(shard, record)


def _forget_summary(results: dict[int, dict]) -> dict:
    """What a forget request did, per shard (JSON keys are strings)."""
    return {
        "shards_retrained": sorted(s for s, r in results.items() if not r["already_applied"]),
        "slices_retrained": {str(s): r["stages_replayed"] for s, r in sorted(results.items())},
        "from_stage": {str(s): r["from_stage"] for s, r in sorted(results.items())},
        "versions": {str(s): r["version"] for s, r in sorted(results.items())},
        "shard_seconds": {str(s): r["seconds"] for s, r in sorted(results.items())},
    }


def aggregate(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean-softmax predictions and majority-vote predictions (ties → lowest class) from (S, N, C)."""
    mean = probs.mean(axis=0)
    votes = probs.argmax(axis=2)  # (S, N)
    counts = np.apply_along_axis(np.bincount, 0, votes, minlength=probs.shape[2])  # (C, N)
    return mean, counts.argmax(axis=0)
