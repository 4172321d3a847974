"""Progress messages: every module logs to `logging.getLogger(__name__)` (under `pipeline`); the
process's edge decides where they go. The CLI shows INFO on stderr (stdout is for the summary and
--json), a Tune trial prefixes its id, and the run's coordinator shows only warnings (Ray forwards
its stderr to the waiting client). A library caller that sets nothing sees warnings only (Python's
last-resort handler); pytest's `caplog` sees everything."""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TextIO

ROOT = "pipeline"


class _Shown(logging.Handler):
    """The handler `show` installs. It looks the stream up at each message (so a stream swapped
    later, e.g. by pytest's capture, is the one written to), and a second `show` replaces it."""

    def __init__(self, stream: Callable[[], TextIO], level: int, prefix: str):
        super().__init__(level)
        self.stream = stream
        self.setFormatter(logging.Formatter(prefix.replace("%", "%%") + "%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            out = self.stream()
            out.write(self.format(record) + "\n")
            out.flush()
        except Exception:  # noqa: BLE001 - logging's own contract: a failed message never fails the caller
            self.handleError(record)


def show(stream: Callable[[], TextIO] = lambda: sys.stderr, level: int = logging.INFO, prefix: str = "",
         alone: bool = False) -> None:
    """Send the package's messages at `level` and above to `stream()`, one per line, as written.
    `alone`: only there, not also to handlers on Python's root logger (a Ray worker's, which Tune
    configures: each line would be printed twice). The CLI keeps them, so `caplog` still sees all."""
    root = logging.getLogger(ROOT)
    for handler in [h for h in root.handlers if isinstance(h, _Shown)]:
        root.removeHandler(handler)
    root.addHandler(_Shown(stream, level, prefix))
    root.setLevel(min(level, logging.INFO))
    root.propagate = not alone
