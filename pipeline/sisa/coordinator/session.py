"""The client side of a run's coordinator: find or start it, attach, submit, wait, stop."""
from __future__ import annotations

import logging
import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pipeline.config import Config
from pipeline.core.checkpoints import CheckpointIntegrityError
from pipeline.errors import RecoverableError
from pipeline.sisa import cluster
from pipeline.sisa.coordinator.actor import WAIT_POLL_S, Coordinator, _Closing
from pipeline.sisa.coordinator.lease import Lease, cluster_identity
from pipeline.sisa.coordinator.release import ReleaseObserver
from pipeline.sisa.driver import OnStage, Placement, ShardFailure, actor_name
from pipeline.sisa.results import ForgetResult
from pipeline.storage import receipts
from pipeline.storage.ledger import ForgetRequestError, new_request_id
from pipeline.storage.rundir import RunDir, RunError

logger = logging.getLogger(__name__)


def _remote():
    return ray.remote(Coordinator)


def find(run: RunDir, config: Config):
    """The run's live coordinator in this cluster, or None."""
    return cluster.named_actor(actor_name(run, "coordinator"), config.ray.namespace)


def ensure(run: RunDir, config: Config, keep_alive: bool = False,
           observer: ReleaseObserver | None = None, placement: Placement | None = None):
    """The run's coordinator, started if none is alive (waiting for another cluster's lease first);
    `observer` is what the new one tells MLflow when requests are applied (see release.py).

    Inside a Tune trial (`placement`: the trial's placement group) the coordinator is not detached:
    it lives in the trial's group, owned by the trial's process, and goes with the trial."""
    handle = find(run, config)
    if handle is not None:
        return handle
    Lease(run, cluster_identity()).wait_until_free(config.ray.lease_wait_s)
    where = ({"lifetime": "detached"} if placement is None else
             {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement, placement_group_bundle_index=-1)})
    return _remote().options(
        name=actor_name(run, "coordinator"), namespace=config.ray.namespace, get_if_exists=True,
        max_restarts=-1, max_task_retries=-1, max_concurrency=64, num_cpus=0, **where,
    ).remote(run.uri, keep_alive, observer, placement)


def _unwrap(exc: Exception) -> Exception:
    """The user-facing error inside a Ray error (bad ids, a refused lease, a damaged checkpoint)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, (ForgetRequestError, RunError, CheckpointIntegrityError, cluster.ClusterError)):
        return cause
    if isinstance(cause, _Closing):
        return cause
    if isinstance(exc, RayActorError) and "_Closing" in str(exc):
        return _Closing()
    return ShardFailure(f"the run's coordinator failed: {cause!r}" if cause else f"the run's coordinator died: {exc}")


class RequestTimeout(RecoverableError, TimeoutError):
    """A waiting client gave up; the request stays recorded and the coordinator keeps working on it."""


CALL_TIMEOUT_S = 120.0  # one coordinator call (a wait poll answers within ~1 s; submits validate and write once)
CLOSING_TRIES = 10  # `_Closing` answers (0.5 s apart) before a client replaces a coordinator stuck closing


class Session:
    """A client's use of the run's coordinator: attach → (submit, wait)* → release."""

    def __init__(self, run: RunDir, config: Config, keep_alive: bool = False,
                 observer: ReleaseObserver | None = None, timeout_s: float | None = None, placement: Placement | None = None):
        self.run, self.config, self.keep_alive, self.observer = run, config, keep_alive, observer
        self.placement = placement
        self.timeout_s = timeout_s if timeout_s is not None else config.ray.wait_timeout_s
        self.handle, self.actors = None, []

    def __enter__(self) -> Session:
        closing = 0
        for _ in range(20 + CLOSING_TRIES):
            self.handle = ensure(self.run, self.config, self.keep_alive, self.observer, self.placement)
            try:
                self.actors = ray.get(self.handle.attach.remote())
                return self
            except RayActorError:
                time.sleep(0.5)  # it closed itself between `find` and `attach`: start a new one
                continue
            except RayTaskError as exc:
                error = _unwrap(exc)
                if not isinstance(error, _Closing):
                    ray.kill(self.handle, no_restart=True)  # it could not open the run: the next command starts afresh
                    self.handle = None
                    raise error from None
                closing += 1
                if closing >= CLOSING_TRIES:  # stuck closing (its closer died): replace it
                    logger.warning(f"the run's coordinator has been closing for {closing * 0.5:g}s: replacing it")
                    ray.kill(self.handle, no_restart=True)
                    closing = 0
                time.sleep(0.5)  # another client is closing it: wait for the name to be free
        raise ShardFailure(f"could not attach to the coordinator of {self.run.uri}; check the Ray cluster (`ray status`)")

    def __exit__(self, *exc_info) -> None:
        if self.handle is None:
            return
        try:
            if ray.get(self.handle.release.remote()):
                ray.kill(self.handle, no_restart=True)
        except (RayActorError, RayTaskError):
            pass

    def call(self, method: str, *args, timeout_s: float = CALL_TIMEOUT_S):
        """One call to the coordinator, bounded: a coordinator that does not answer within
        `timeout_s` is reported as gone (ShardFailure), never waited for forever."""
        try:
            return ray.get(getattr(self.handle, method).remote(*args), timeout=timeout_s)
        except GetTimeoutError:
            raise ShardFailure(f"the run's coordinator did not answer `{method}` within {timeout_s:g}s") from None
        except (RayActorError, RayTaskError) as exc:
            raise _unwrap(exc) from None

    def submit_batch(self, requests: list[list[int]]) -> list[str]:
        """Record one request per id list, all in one durable write; their ids, at once."""
        request_ids = [new_request_id() for _ in requests]
        self.call("submit_batch", dict(zip(request_ids, requests)))
        return request_ids

    def forget(self, ids: list[int], on_stage: OnStage | None = None) -> ForgetResult:
        """Submit and wait; stage records reach `on_stage` as shards finish them."""
        start = time.perf_counter()
        request_id = new_request_id()
        self.call("submit", request_id, ids)
        logger.info(f"forget request {request_id}: {len(ids)} id(s) submitted to the run's coordinator")
        return self.wait(request_id, ids, start, on_stage)

    def wait(self, request_id: str, ids: list[int], start: float, on_stage: OnStage | None = None) -> ForgetResult:
        """Follow a request until done. What the coordinator is retrying meanwhile is printed once;
        after `timeout_s` (ray.wait_timeout_s) a RequestTimeout names the request and how to follow it."""
        seen, shown, lost = 0, None, 0
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                answer = self.call("wait", request_id, WAIT_POLL_S, seen)
            except ShardFailure as exc:  # the coordinator is gone for good: start a new one, which resumes the request
                lost += 1
                if lost > 3 or time.monotonic() >= deadline:
                    raise ShardFailure(f"{exc}; request {request_id} stays recorded: follow it with "
                                       f"`dpsisa request --run-dir {self.run.uri} --id {request_id} --wait`") from None
                logger.warning(f"the run's coordinator is gone ({exc}); starting a new one to finish request {request_id}")
                self.__enter__()
                self.call("resume")
                continue
            seen += len(answer.records)
            for record in answer.records:  # every waiting client sees its replays' progress, not only the first
                loss = "" if record.get("loss") is None else f"loss {record['loss']:.4f}, "
                logger.info(f"request {request_id}: shard {record['shard']} replayed stage {record['stage']} "
                         f"({loss}{record.get('seconds', 0.0):.1f}s)")
                if on_stage is not None:
                    on_stage(record["shard"], {k: v for k, v in record.items() if k != "shard"})
            if answer.status == "failed":
                if answer.kind == "integrity":
                    raise CheckpointIntegrityError(answer.error)
                raise ShardFailure(f"{answer.error} (request {request_id} stays pending; follow it with "
                                   f"`dpsisa request --run-dir {self.run.uri} --id {request_id} --wait`)")
            if answer.status == "done":
                result = ForgetResult.from_dict(answer.result) if answer.result else self._from_receipt(request_id, ids)
                result.seconds = time.perf_counter() - start
                return result
            if answer.status == "unknown":
                raise ShardFailure(f"the coordinator does not know request {request_id}")
            if answer.error and answer.error != shown:
                shown = answer.error
                logger.warning(f"request {request_id} is {answer.status}; the run's coordinator is retrying: {shown}")
            if time.monotonic() >= deadline:
                raise RequestTimeout(
                    f"request {request_id} is not done after {self.timeout_s:g}s (it stays recorded as {answer.status} and "
                    f"the coordinator keeps working on it); follow it with "
                    f"`dpsisa request --run-dir {self.run.uri} --id {request_id} --wait`")

    def _from_receipt(self, request_id: str, ids: list[int]) -> ForgetResult:
        """A request applied by an earlier coordinator instance (it was restarted meanwhile): its receipt says what happened."""
        receipt = receipts.read(self.run, request_id) or {"shards": {}, "batch": [request_id]}
        shards = receipt["shards"]
        return ForgetResult(
            request_id=request_id, ids=len(ids),
            shards_retrained=sorted(int(s) for s, e in shards.items() if e["from_stage"] is not None),
            stages_replayed={s: e["stages_replayed"] for s, e in shards.items()},
            from_stage={s: e["from_stage"] for s, e in shards.items()},
            versions={s: e["new_version"] for s, e in shards.items()}, shard_seconds={}, seconds=0.0,
            batch=receipt["batch"])

    def complete_pending(self, on_stage: OnStage | None = None) -> dict[str, ForgetResult]:
        """Have the coordinator finish requests a crash left pending; wait for them."""
        pending = self.run.ledger().unfinished()
        if not pending:
            return {}
        logger.info(f"completing {len(pending)} pending forget request(s) through the run's coordinator")
        self.call("resume")
        start = time.perf_counter()
        out = {}
        for rid, ids in pending.items():
            out[rid] = self.wait(rid, ids, start, on_stage)
            out[rid].completed_pending = True
        return out


def stop(run: RunDir, config: Config) -> int:
    """Stop the run's coordinator (and its shard actors); returns how many actors stopped."""
    handle = find(run, config)
    if handle is None:
        return 0
    try:
        shards = len(ray.get(handle.attach.remote()))
        ray.get(handle.stop.remote())
    except (RayActorError, RayTaskError):
        shards = 0
    ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + 30
    while find(run, config) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    return shards + 1
