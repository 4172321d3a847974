"""What verbs return, typed. Converted to dicts only at the edges (CLI `--json`, MLflow)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

DEPRECATED_STAGES_KEY = "slices_retrained"  # = stages_replayed; dropped from the JSON in the next release


@dataclass
class ForgetResult:
    """One forget request, done: which shards replayed from which stage, the new versions."""

    request_id: str
    ids: int
    shards_retrained: list[int]
    stages_replayed: dict[str, int]  # JSON keys are strings: shard → stages replayed
    from_stage: dict[str, int | None]  # shard → first replayed stage (None: it had already applied them)
    versions: dict[str, int]  # shard → model version that no longer saw the ids
    shard_seconds: dict[str, float]
    seconds: float  # end to end, as the caller waited
    batch: list[str] = field(default_factory=list)  # request ids applied together with this one (coalesced)
    subjects: list[str] = field(default_factory=list)  # data subjects erased (forget --subject)
    receipt: dict | None = None  # the erasure receipt (RUN_DIR/receipts/REQUEST_ID.json)
    completed_pending: bool = False  # finished after a crash left it pending
    full_train_seconds: float | None = None
    speedup: float | None = None
    samples_processed: float | None = None  # replayed SGD sample-steps of the whole batch
    full_train_samples: float | None = None
    work_fraction: float | None = None
    registered_model: str | None = None  # the MLflow registered model and the version holding this request's result
    registered_version: int | None = None

    @classmethod
    def of(cls, request_id: str, ids: list[int], shard_results: dict[int, dict], seconds: float,
           batch: list[str], completed_pending: bool = False, owners: set[int] | None = None) -> ForgetResult:
        """From the owning shards' forget results (`owners`: this request's shards within a batch)."""
        mine = {s: r for s, r in sorted(shard_results.items()) if owners is None or s in owners}
        return cls(request_id=request_id, ids=len(ids),
                   shards_retrained=sorted(s for s, r in mine.items() if r["from_stage"] is not None),
                   stages_replayed={str(s): r["stages_replayed"] for s, r in mine.items()},
                   from_stage={str(s): r["from_stage"] for s, r in mine.items()},
                   versions={str(s): r["version"] for s, r in mine.items()},
                   shard_seconds={str(s): r["seconds"] for s, r in mine.items()},
                   seconds=seconds, batch=list(batch), completed_pending=completed_pending)

    def to_dict(self) -> dict:
        out = asdict(self)
        out[DEPRECATED_STAGES_KEY] = out["stages_replayed"]  # the old name, kept in the JSON for one release
        return out

    @classmethod
    def from_dict(cls, payload: dict) -> ForgetResult:
        """From `to_dict`'s JSON, also from a coordinator of the previous release (`slices_retrained` only)."""
        payload = dict(payload)
        stages = payload.pop(DEPRECATED_STAGES_KEY, None)
        payload.setdefault("stages_replayed", stages)
        return cls(**payload)

    def human(self) -> str:
        text = (f"request {self.request_id}: forgot {self.ids} id(s); retrained shard(s) {self.shards_retrained} "
                f"(stages replayed {self.stages_replayed}) in {self.seconds:.1f}s")
        if self.full_train_seconds is not None:
            text += (f" vs full training {self.full_train_seconds:.1f}s (speed-up ×{self.speedup:.1f}; "
                     f"{self.work_fraction:.0%} of the training work replayed)")
        return text


@dataclass
class ShardStatus:
    """One shard as `dpsisa status` reports it: its live version and where it runs."""

    shard: int
    version: int
    forgotten: int
    samples: int
    epsilon: float | None
    epsilon_cumulative: float | None
    releases: int
    node: str | None  # Ray node id of the actor that committed the live version
    host: str | None
    device: str | None
    live: bool = False  # node/device are those of a running (warm) actor, not of the last commit

    def to_dict(self) -> dict:
        return asdict(self)
