"""The coordinator's wire protocol, typed: what `submit` and `wait` answer its clients (pickled by
Ray; dicts appear only at the JSON, CLI and MLflow edges)."""
from __future__ import annotations

from dataclasses import dataclass, field

STATUSES = ("pending", "applied", "done", "failed", "unknown")


@dataclass(frozen=True)
class Submitted:
    """A request recorded durably as `pending` (or recognised as already recorded)."""

    request_id: str
    status: str = "pending"


@dataclass(frozen=True)
class WaitAnswer:
    """Where a request stands after one bounded wait.

    status: pending | applied | done | failed | unknown (the coordinator has no such request).
    records: its batch's stage records since the client's last answer.
    result: the ForgetResult fields when this coordinator instance applied it (None when an earlier
      instance did: the receipt says what happened).
    error: pending/applied: what the writer is retrying meanwhile (None when healthy); failed: why.
    kind: failed: what failed ("integrity" for a damaged checkpoint, "open", a replay's kind).
    """

    status: str
    records: list[dict] = field(default_factory=list)
    result: dict | None = None
    error: str | None = None
    kind: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown request status {self.status!r}")
