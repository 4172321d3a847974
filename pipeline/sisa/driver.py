"""The driver: sizes, places and spawns one ShardActor per shard on Ray, fans calls out, aggregates.

Ray lives here, in `coordinator/` and in `cluster.py` (and the sweep). Actors are sized by a
`ShardLayout` from what the cluster (or a Tune trial's placement group) holds, placed with one
bundle per shard (SPREAD), and load everything from the run directory so Ray can restart them.
Forget requests are not applied here: the run's coordinator (`coordinator/`) is the one forget
engine, also inside a Tune trial; it owns the ensemble after training.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pipeline.config import Config
from pipeline.core.checkpoints import CheckpointIntegrityError
from pipeline.errors import RecoverableError
from pipeline.sisa import cluster
from pipeline.sisa.shard import Shard
from pipeline.storage.rundir import RunDir, open_run

logger = logging.getLogger(__name__)

Placement = PlacementGroup  # a Tune trial's placement group: where a trial's coordinator and shards run

PLACEMENT_TIMEOUT_S = 60
PROGRESS_GROUP = "progress"  # a second concurrency group per actor: `progress` answers while fit/forget runs
PROGRESS_POLL_S = 1.0
OnStage = Callable[[int, dict], None]  # (shard, progress record of one finished stage)


class ShardFailure(RecoverableError, RuntimeError):
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


def actor_name(run: RunDir | Path | str, part: int | str) -> str:
    """Name of a run's named Ray object: the coordinator ("coordinator"), the placement group (-1)."""
    from pipeline.config import digest

    uri = open_run(run).uri
    suffix = "placement" if part == -1 else part if isinstance(part, str) else f"shard{part:03d}"
    return f"dpsisa-{digest(uri)}-{suffix}"


@dataclass(frozen=True)
class ShardLayout:
    """Per-shard resources and their placement: one bundle per shard, SPREAD over nodes.

    The only place shard actors are sized: a run's own placement group (`for_cluster`), or a
    share of a Tune trial's placement group (`for_bundles`)."""

    shards: int
    resources: Resources

    @classmethod
    def for_cluster(cls, config: Config, total: dict[str, float]) -> ShardLayout:
        return cls(config.shards.count, shard_resources(config, total))

    @classmethod
    def for_placement(cls, config: Config, placement: Placement | None) -> ShardLayout:
        """The layout a run's shards get: a share of the trial's group, or the cluster's (a
        ClusterError when they do not fit: checked before any work, again when they are spawned)."""
        if placement is None:
            return cls.for_cluster(config, ray.cluster_resources())
        return cls.for_bundles(config, placement.bundle_specs)

    @classmethod
    def for_bundles(cls, config: Config, bundles: list[dict[str, float]]) -> ShardLayout:
        """Inside a Tune trial: the shards share the trial's bundles after the trainable's own."""
        totals: dict[str, float] = {}
        for spec in bundles[1:] or bundles:
            for key, value in spec.items():
                totals[key] = totals.get(key, 0.0) + value
        return cls(config.shards.count, shard_resources(config, totals))

    @property
    def bundle(self) -> dict[str, float]:
        return {"CPU": self.resources.cpus, **({"GPU": self.resources.gpus} if self.resources.gpus else {})}

    def reserve(self) -> PlacementGroup:
        """A placement group with one bundle per shard (SPREAD: shards land on as many nodes as
        fit), owned by the calling process: Ray removes it with its owner."""
        group = placement_group([self.bundle] * self.shards, strategy="SPREAD")
        try:
            ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except GetTimeoutError:
            remove_placement_group(group)
            raise cluster.ClusterError(
                f"could not reserve {self.shards} × (CPU {self.resources.cpus}, GPU {self.resources.gpus}) within "
                f"{PLACEMENT_TIMEOUT_S}s; the cluster is busy or too small: free resources or lower shards.count."
            ) from None
        return group


def spawn_shards(run: RunDir, config: Config, recipes: list[dict], layout: ShardLayout, placement: PlacementGroup,
                 own_bundles: bool) -> list:
    """One Shard actor per shard. Constructor arguments are plain values (the run's URI, config,
    recipe), never object refs: each actor loads its model and its own shard's data from storage,
    so Ray can restart it (on another node, after a node loss) and retry the call it was running."""
    remote = ray.remote(concurrency_groups={PROGRESS_GROUP: 1})(Shard)  # default group: 1 (fit, forget, …)
    restarts = config.ray.max_restarts
    return [remote.options(
        num_cpus=layout.resources.cpus, num_gpus=layout.resources.gpus, max_concurrency=1,
        max_restarts=restarts, max_task_retries=restarts,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement, placement_group_bundle_index=s if own_bundles else -1),
    ).remote(run.uri, s, config.to_dict(), recipes[s], config.train.threads) for s in range(config.shards.count)]


class Ensemble:
    """S ShardActors over one run directory."""

    def __init__(self, run: RunDir, config: Config, actors: list, placement: PlacementGroup | None, owned: bool = True):
        self.run, self.config, self.actors = run, config, actors
        self.placement, self.owned = placement, owned
        self.ledger = run.ledger()

    @property
    def run_dir(self) -> str:
        return self.run.uri

    # -- construction: reuse (coordinator.attach), reserve (ShardLayout.reserve), spawn -------
    @classmethod
    def start(cls, run: RunDir, config: Config, recipes: list[dict], placement: PlacementGroup | None = None) -> Ensemble:
        """Reserve one bundle per shard (or share a Tune trial's `placement`) and spawn the actors."""
        own = placement is None
        layout = ShardLayout.for_placement(config, placement)
        if own:
            placement = layout.reserve()
        actors = spawn_shards(run, config, recipes, layout, placement, own)
        logger.info(f"started {len(actors)} shard actors (CPU {layout.resources.cpus}, GPU {layout.resources.gpus} each)")
        return cls(run, config, actors, placement if own else None)

    @classmethod
    def attached(cls, run: RunDir, config: Config, actors: list) -> Ensemble:
        """The live actors of the run's coordinator (owned by it: shutdown leaves them running)."""
        return cls(run, config, actors, None, owned=False)

    def shutdown(self) -> None:
        """Stop the actors (and placement group) this ensemble owns."""
        if not self.owned:
            return
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.placement is not None:
            remove_placement_group(self.placement)
            self.placement = None

    # -- fan-out ------------------------------------------------------------------------------
    @cached_property
    def parallel(self) -> int:
        """How many shards train, replay or verify at once: `ray.max_parallel_shards`, else as many
        as the cluster has CPUs for (`train.threads` each). More would not finish sooner on the
        same cores (each shard's threads are fixed), but every one of them holds its working set."""
        if self.config.ray.max_parallel_shards:
            return int(self.config.ray.max_parallel_shards)
        cpus = ray.cluster_resources().get("CPU", 1.0)
        return max(1, int(cpus // max(1, self.config.train.threads)))

    def _gather(self, refs: dict, what: str, report: bool = False, progress: StageProgress | None = None) -> dict:
        """Wait for every ref (ref → shard), logging each shard's end with `report` (and, with
        `progress`, each shard's finished stages while it works); a dead actor becomes a ShardFailure."""
        return self._run(dict(refs), [], what, report, progress)

    def _limited(self, calls: dict[int, Callable], what: str, report: bool = False,
                 progress: StageProgress | None = None) -> dict:
        """Like `_gather` for `shard → call()` (each returns a ref), started as earlier ones
        finish, at most `parallel` at a time."""
        return self._run({}, list(calls.items()), what, report, progress)

    def _run(self, pending: dict, queued: list, what: str, report: bool, progress: StageProgress | None) -> dict:
        total, limit = len(pending) + len(queued), self.parallel if queued else len(pending)
        results, start = {}, time.perf_counter()
        while pending or queued:
            while queued and len(pending) < limit:
                shard, call = queued.pop(0)
                pending[call()] = shard
            polls = [] if progress is None else progress.ask(set(pending.values()))
            done, _ = ray.wait(list(pending) + polls, num_returns=1, timeout=PROGRESS_POLL_S if progress else None)
            for ref in done:
                if ref not in pending:  # a progress answer
                    progress.answer(ref)
                    continue
                shard = pending.pop(ref)
                results[shard] = self.result(shard, ref, what)
                if progress is not None:  # the result carries every record: none is lost between polls
                    progress.report(shard, results[shard].get("progress", []))
                if report:
                    logger.info(f"  {what}: shard {shard} done ({len(results)}/{total}, {time.perf_counter() - start:.1f}s)")
        return results

    @staticmethod
    def result(shard: int, ref, what: str):
        """The value of a finished shard call; a dead actor or a failed call becomes a ShardFailure
        (a damaged checkpoint: CheckpointIntegrityError, which rerunning cannot help)."""
        try:
            return ray.get(ref)
        except RayActorError as exc:
            raise ShardFailure(f"shard {shard} actor died during {what}: {exc.__class__.__name__}") from exc
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, CheckpointIntegrityError):  # rerunning cannot help: the user must act
                raise CheckpointIntegrityError(f"shard {shard}: {exc.cause}") from exc
            raise ShardFailure(f"shard {shard} failed during {what}: {exc.cause!r}") from exc

    def _progress(self, job: str, on_stage: OnStage | None) -> StageProgress | None:
        return None if on_stage is None else StageProgress(self.actors, job, on_stage)

    def fit(self, on_stage: OnStage | None = None) -> dict[int, dict]:
        """Train every shard; `on_stage(shard, record)` sees each finished stage while training goes on."""
        return self._limited({s: a.fit.remote for s, a in enumerate(self.actors)}, "train", True,
                            self._progress("fit", on_stage))

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(S, N, C) softmax outputs of every constituent model."""
        ref = ray.put(x)
        results = self._gather({a.predict_proba.remote(ref): s for s, a in enumerate(self.actors)}, "predict")
        return np.stack([results[s] for s in range(len(self.actors))])

    def predict_live(self, x: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """(N, C) mean-softmax output and, per shard, the model version that made its part."""
        ref = ray.put(x)
        results = self._gather({a.predict.remote(ref): s for s, a in enumerate(self.actors)}, "predict")
        return (np.stack([results[s]["probs"] for s in range(len(self.actors))]).mean(axis=0),
                [int(results[s]["version"]) for s in range(len(self.actors))])

    def predict_mean(self, x: np.ndarray) -> np.ndarray:
        """(N, C) mean-softmax output of the ensemble (what is served)."""
        return self.predict_proba(x).mean(axis=0)

    def verify(self, shards: list[int], x_eval: np.ndarray | None = None) -> dict[int, dict]:
        ref = None if x_eval is None else ray.put(x_eval)
        return self._limited({s: partial(self.actors[s].verify.remote, ref) for s in shards}, "verify", True)

    def status(self) -> dict[int, dict]:
        return self._gather({a.status.remote(): s for s, a in enumerate(self.actors)}, "status")


class StageProgress:
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


def aggregate(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean-softmax predictions and majority-vote predictions (ties → lowest class) from (S, N, C)."""
    mean = probs.mean(axis=0)
    votes = probs.argmax(axis=2)  # (S, N)
    counts = np.apply_along_axis(np.bincount, 0, votes, minlength=probs.shape[2])  # (C, N)
    return mean, counts.argmax(axis=0)
