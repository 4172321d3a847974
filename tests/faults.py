"""Fault injection from the test side: kill a real shard actor while a forget request is in
flight (production actors carry no test hooks)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator

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


@contextlib.contextmanager
def read_only(folder) -> Iterator[None]:
    """Make a local folder refuse new files (a read-only ledger) for the block, from the test side:
    `chmod a-w` for an ordinary user; as root, whom permission bits do not stop, `chattr +i` (needs
    CAP_LINUX_IMMUTABLE; the test is skipped, saying so, where the machine lacks it)."""
    import pytest

    folder = str(folder)
    if os.geteuid() != 0:
        mode = os.stat(folder).st_mode
        os.chmod(folder, mode & ~0o222)
        undo = lambda: os.chmod(folder, mode)  # noqa: E731
    else:
        made = subprocess.run(["chattr", "+i", folder], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"cannot make {folder} read-only as root: chattr +i: {made.stderr.strip()}")
        undo = lambda: subprocess.run(["chattr", "-i", folder], check=True)  # noqa: E731
    try:
        yield
    finally:
        undo()


class SwitchableProxy:
    """A TCP forwarder on 127.0.0.1 in front of a server (the object store): `off()` drops every
    open connection and refuses new ones until `on()` — a storage outage the production code sees
    as network errors, injected from the test side."""

    def __init__(self, upstream_host: str, upstream_port: int):
        import socket

        self.upstream = (upstream_host, upstream_port)
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.port = self._server.getsockname()[1]
        self._up, self._open, self._lock, self._stop = True, set(), threading.Lock(), False
        self.refused, self._fail, self._rng = 0, 0.0, None
        threading.Thread(target=self._accept, daemon=True, name="switchable-proxy").start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def off(self) -> None:
        with self._lock:
            self._up = False
            for sock in list(self._open):
                self._close(sock)

    def on(self) -> None:
        with self._lock:
            self._up, self._fail = True, 0.0

    def flaky(self, fraction: float, rng) -> None:
        """Refuse each new connection with probability `fraction` (seeded by `rng`) until `on()`;
        open connections are dropped so that clients reconnect through the lottery."""
        with self._lock:
            self._fail, self._rng = fraction, rng
            for sock in list(self._open):
                self._close(sock)

    def close(self) -> None:
        self._stop = True
        self.off()
        self._server.close()

    def _close(self, sock) -> None:
        import socket

        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        self._open.discard(sock)

    def _accept(self) -> None:
        import socket

        while not self._stop:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                if not self._up or (self._fail and self._rng.random() < self._fail):
                    self.refused += 1
                    client.close()
                    continue
                try:
                    upstream = socket.create_connection(self.upstream, timeout=5)
                except OSError:
                    client.close()
                    continue
                self._open.update({client, upstream})
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source, target) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                target.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._close(source)
                self._close(target)
