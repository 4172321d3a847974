"""Fault injection from the test side: kill a real shard actor while a forget request is in
flight (production actors carry no test hooks)."""
from __future__ import annotations

import threading
import time

import ray

from pipeline.sisa import coordinator


def kill_shard_while_pending(run, shard: int, timeout_s: float = 120.0) -> threading.Thread:
    """Start a thread that waits until a forget request is recorded as pending and the run's
    coordinator has its shard actors, then kills `shard`'s actor (for good when the run's
    ray.max_restarts is 0) and lets the coordinator go. Join it after the forget returns."""
    config = run.config()
    done = threading.Event()

    def work() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            handle = coordinator.find(run, config)
            if handle is not None and run.ledger().pending():
                try:
                    actors = ray.get(handle.attach.remote())  # holds the coordinator open until released below
                except ray.exceptions.RayError:
                    time.sleep(0.05)
                    continue
                ray.kill(actors[shard], no_restart=True)
                done.set()
                time.sleep(1.0)
                try:
                    if ray.get(handle.release.remote()):
                        ray.kill(handle, no_restart=True)
                except ray.exceptions.RayError:
                    pass
                return
            time.sleep(0.02)

    thread = threading.Thread(target=work, daemon=True)
    thread.killed = done  # type: ignore[attr-defined]
    thread.start()
    return thread
