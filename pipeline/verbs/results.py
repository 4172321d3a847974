"""What the run verbs return, typed: frozen dataclasses with one key vocabulary. They become dicts
only at the edges (`to_dict`: the CLI's --json, MLflow) and text only through their own `human`
(the CLI without --json). The forget verb's result is `sisa.results.ForgetResult` (the coordinator's
protocol). `TrainSummary` and `Evaluation` carry an open set of named metrics (attacks add theirs), so
they are also read-only mappings over their JSON keys (`summary["accuracy"]`). The experiments' results
sit beside their verbs (`scoring.ScoreResult`, `audit.AuditResult`, `audit_whitebox.WhiteBoxAuditResult`,
`baselines.results.Comparison` and `UnlearnableResult`)."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.sisa.results import ShardStatus


@dataclass(frozen=True)
class SubmittedRequest:
    """One request of `forget --no-wait --each`: a subject's samples."""

    request_id: str
    subject: str
    ids: int


@dataclass(frozen=True)
class Submission:
    """`forget --no-wait`: recorded as pending. One request (`request_id`), or one per subject (`requests`)."""

    run_dir: str
    ids: int
    request_id: str | None = None
    subjects: tuple[str, ...] = ()
    requests: tuple[SubmittedRequest, ...] | None = None  # with --each
    status: str = "pending"

    def to_dict(self) -> dict[str, Any]:
        if self.requests is not None:
            return {"run_dir": self.run_dir, "status": self.status, "ids": self.ids,
                    "requests": [asdict(r) for r in self.requests]}
        return {"run_dir": self.run_dir, "request_id": self.request_id, "status": self.status, "ids": self.ids,
                "subjects": list(self.subjects)}

    def human(self) -> str:
        def follow(request_id: str) -> str:
            return f"`dpsisa request --run-dir {self.run_dir} --id {request_id} --wait`"

        if self.requests is not None:
            return "\n".join([f"{len(self.requests)} requests recorded as pending ({self.ids} id(s)); follow one with "
                              f"{follow('ID')}",
                              *(f"  request {r.request_id}: subject {r.subject}, {r.ids} id(s)" for r in self.requests)])
        return f"request {self.request_id}: {self.ids} id(s) recorded as pending; follow it with {follow(self.request_id)}"


@dataclass(frozen=True)
class RequestStatus:
    """`dpsisa request`: one request's status (the least advanced of its ids) and its receipt once done."""

    run_dir: str
    request_id: str
    status: str
    ids: int
    requested_at: str
    receipt: dict | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def human(self) -> str:
        versions = ({s: e["new_version"] for s, e in self.receipt["shards"].items()} if self.receipt else None)
        return f"request {self.request_id}: {self.status} ({self.ids} id(s))" + (f"; new versions {versions}" if versions else "")


@dataclass(frozen=True)
class Verification:
    """`dpsisa verify`: touched shards retrained from scratch without their forgotten ids, compared bit for bit."""

    exact: bool
    shards_checked: list[int]
    receipts_verified: int
    shards: list[dict]  # per shard: shard, version, exact, forgotten, mismatches, …
    device: str
    unlearning: dict  # the yardstick: forget/retain/test accuracy, KL to the oracle

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def human(self) -> str:
        lines = [f"{'EXACT' if self.exact else 'NOT EXACT'}: shard(s) {self.shards_checked} equal a from-scratch "
                 "retraining without the forgotten ids" + ("" if self.exact else " — MISMATCH")]
        lines += [f"  shard {s['shard']} v{s['version']}: exact={s['exact']} ({s['forgotten']} forgotten)"
                  + (f" mismatches {s['mismatches'][:3]}" if s["mismatches"] else "") for s in self.shards]
        u = self.unlearning
        if u:
            forget = "n/a" if u["forget_accuracy"] is None else f"{u['forget_accuracy']:.3f}"
            lines.append(f"  yardstick: forget-set accuracy {forget}, retain {u['retain_accuracy']:.3f}, test "
                         f"{u['test_accuracy']:.4f} (oracle {u['oracle_test_accuracy']:.4f}), KL(live ‖ oracle) "
                         f"{u['kl_to_oracle']:.3g}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Stopped:
    """`dpsisa stop`: the run's coordinator and shard actors released."""

    run_dir: str
    actors_stopped: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def human(self) -> str:
        return f"stopped {self.actors_stopped} actor(s) (coordinator and shards) of {self.run_dir}"


@dataclass(frozen=True)
class RunStatus:
    """`dpsisa status`: every shard's live version and ε, the requests by status, what ε means per person."""

    run_dir: str
    shards: tuple[ShardStatus, ...]
    pending: list[dict]  # {request_id, status, ids}
    applied: list[dict]
    done: list[dict]
    epsilon_target: float | None
    delta: float
    privacy: dict = field(default_factory=dict)  # privacy_unit, epsilon_per_person, … (`RunDir.person_privacy`)
    coordinator: str = "stopped"  # "warm" when its actors are up

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "shards": [s.to_dict() for s in self.shards], "pending": self.pending,
                "applied": self.applied, "done": self.done, "epsilon_target": self.epsilon_target, "delta": self.delta,
                **self.privacy, "coordinator": self.coordinator}

    def human(self) -> str:
        applied = f", {len(self.applied)} applied (registry pending)" if self.applied else ""
        lines = [f"run {self.run_dir}: {len(self.done)} done{applied}, {len(self.pending)} pending forget request(s)"]
        for sh in self.shards:
            eps = "no DP" if sh.epsilon is None else (
                f"ε {sh.epsilon:.3f} per release (cumulative over its {sh.releases} releases {sh.epsilon_cumulative:.3f}"
                + (": above the per-release target because each release is a new mechanism)"
                   if self.epsilon_target is not None and sh.epsilon_cumulative > self.epsilon_target else ")"))
            lines.append(f"  shard {sh.shard}: v{sh.version}, {sh.samples} samples, {sh.forgotten} forgotten, {eps}")
        return "\n".join(lines)


@dataclass(frozen=True)
class SubjectStatus:
    """`dpsisa status --subject`: where one data subject's samples are and which model versions saw them."""

    run_dir: str
    subject: str
    samples: list[dict]  # sample_id, shard, slice, status, request_id, versions_that_saw_it, …
    erased: bool
    receipts: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def human(self) -> str:
        lines = [f"subject {self.subject}: {len(self.samples)} sample(s), "
                 f"{'all erased' if self.erased else 'not (all) erased'}"]
        for x in self.samples:
            saw = x["versions_that_saw_it"]
            lines.append(f"  id {x['sample_id']}: shard {x['shard']} slice {x['slice']}, {x['status']}"
                         + (f" (request {x['request_id']})" if x["request_id"] else "")
                         + f"; versions that saw it: {saw[0]}..{saw[-1]}; live version {x['live_version']}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Predictions:
    """`dpsisa predict`: classes and mean-softmax probabilities of the live ensemble, and who made them."""

    run_dir: str
    predictions: list[int]
    probabilities: list[list[float]]
    model_versions: list[int]  # per shard, the version that answered
    pending_requests: list[str]  # requests pending while the answer was made

    SHOWN = 20  # rows the human summary lists

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def human(self) -> str:
        lines = [f"{len(self.predictions)} prediction(s) from shard versions {self.model_versions}"
                 + (f"; pending requests {self.pending_requests}" if self.pending_requests else "")]
        lines += [f"  {i}: class {c} (p={self.probabilities[i][c]:.3f})" for i, c in enumerate(self.predictions[:self.SHOWN])]
        if len(self.predictions) > self.SHOWN:
            counts = [self.predictions.count(c) for c in range(max(self.predictions) + 1)]
            lines.append(f"  … {len(self.predictions) - self.SHOWN} more (--json prints all); per class {counts}")
        return "\n".join(lines)


class _Metrics(Mapping):
    """Read-only mapping access to a result's JSON keys (`to_dict`), for metrics read by name."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


@dataclass(frozen=True, eq=False)
class Evaluation(_Metrics):
    """`dpsisa evaluate`: test metrics (`accuracy`, `accuracy_ci`, `vote_accuracy`, `shard_accuracy`, `ece`,
    ε per shard, …), membership inference (`mia`, `mia_forgotten`), what ε means per person, LiRA."""

    metrics: dict

    def to_dict(self) -> dict[str, Any]:
        return dict(self.metrics)

    def human(self) -> str:
        return human_metrics(self.metrics)


@dataclass(frozen=True, eq=False)
class TrainSummary(_Metrics):
    """`dpsisa train`: where the run is, how long it took, the evaluate metrics without the attacks
    (and `public_accuracy`), and the registered model version it made live."""

    run_dir: str
    full_train_seconds: float
    total_seconds: float
    metrics: dict
    registered_model: str | None = None
    registered_version: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"run_dir": self.run_dir, "full_train_seconds": self.full_train_seconds,
               "total_seconds": self.total_seconds, **self.metrics}
        if self.registered_model is not None:
            out.update(registered_model=self.registered_model, registered_version=self.registered_version)
        return out

    def human(self) -> str:
        return f"trained {self.run_dir} in {self.full_train_seconds:.1f}s: " + human_metrics(self.metrics)


def _eps(values: list) -> str:
    return "no DP" if not values or values[0] is None else f"{min(values):.3f}..{max(values):.3f}"


def human_metrics(m: dict) -> str:
    """Accuracy, ε, the public model's accuracy, the attacks: the text of `train` and `evaluate`."""
    text = (f"accuracy {m['accuracy']:.4f} (vote {m['vote_accuracy']:.4f}); shards "
            f"{', '.join(f'{a:.3f}' for a in m['shard_accuracy'])}; ε spent {_eps(m['epsilon_spent'])} "
            f"(target {m['epsilon_target']}, δ={m['delta']})")
    if m.get("public_accuracy") is not None:
        text += f"; public model alone {m['public_accuracy']:.4f}"
    if "mia" in m:
        post = m["mia"]["posterior"]
        text += (f"\nMIA (posterior) members vs non-members: AUC {post['auc']:.3f}, advantage {post['advantage']:.3f}; "
                 f"empirical ε lower bound {m['epsilon_lower_bound']:.3f}")
    if m.get("lira"):
        lr = m["lira"]
        for variant in ("offline", "online"):
            if lr.get(variant):
                v = lr[variant]
                text += (f"\nLiRA {variant} (K={lr['reference_models']}, non-members from {lr['nonmembers_from']}): "
                         f"AUC {v['auc']:.3f} ({v['auc_ci'][0]:.3f}..{v['auc_ci'][1]:.3f}), TPR {v['tpr_at_1pct_fpr']:.3f} "
                         f"at 1% FPR, {v['tpr_at_0_1pct_fpr']:.4f} at 0.1% FPR")
        if lr.get("online_skipped"):
            text += f"\n  ({lr['online_skipped']})"
    if "mia_forgotten" in m:
        gone = m["mia_forgotten"]["posterior"]
        text += (f"\nMIA (posterior) forgotten vs non-members: accuracy {gone['accuracy']:.3f} "
                 f"(95% CI {gone['accuracy_ci'][0]:.3f}..{gone['accuracy_ci'][1]:.3f}), AUC {gone['auc']:.3f}")
    return text
