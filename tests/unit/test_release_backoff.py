"""The coordinator's retry waits: exponential up to 30 s, and capped at 5 s for an error whose retry
is a cheap probe (an unreachable MLflow tracking server), so a request is done within seconds of
the server coming back rather than up to half a minute later."""
from __future__ import annotations

import threading

from pipeline.sisa.coordinator.release import Backoff
from pipeline.sisa.coordinator.writer import Writer
from pipeline.tracking.mlflow_runs import TrackingUnavailable


def test_waits_double_up_to_thirty_seconds_and_a_success_starts_again_at_one():
    backoff = Backoff()
    assert [backoff.failed() for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    backoff.succeeded()
    assert backoff.failed() == 1


def test_a_cap_bounds_every_wait_while_it_applies():
    backoff = Backoff()
    assert [backoff.failed(cap=5.0) for _ in range(6)] == [1, 2, 4, 5, 5, 5]
    assert [backoff.failed(), backoff.failed()] == [5, 10]  # an ordinary error again: doubling goes on from there


def _writer() -> Writer:
    writer = Writer.__new__(Writer)  # the state `_fault` touches, without an actor
    writer._error, writer._wake, writer._lock = None, False, threading.Condition()
    writer._warn = lambda message: None
    return writer


def test_the_writer_retries_an_unreachable_tracking_server_every_five_seconds_at_most():
    writer, backoff = _writer(), Backoff()
    for _ in range(8):
        writer._fault("registry/receipts", TrackingUnavailable("the MLflow tracking server does not answer"), backoff)
    assert backoff.delay <= 5.0 and writer._wake
    other = Backoff()
    for _ in range(8):
        writer._fault("registry/receipts", RuntimeError("a bug"), other)
    assert other.delay == 30.0
