"""Where the package's log messages go: `pipeline.logs.show` at a process's edge."""
from __future__ import annotations

import io
import logging

from pipeline import logs


def _shown_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger(logs.ROOT).handlers if isinstance(h, logs._Shown)]


def test_show_prints_each_message_once_with_its_prefix_and_alone_keeps_it_from_a_root_handler():
    package, python_root = logging.getLogger(logs.ROOT), logging.getLogger()
    saved = (list(package.handlers), package.level, package.propagate)
    at_root = io.StringIO()
    root_handler = logging.StreamHandler(at_root)  # as Tune configures a Ray worker's root logger
    python_root.addHandler(root_handler)
    try:
        out = io.StringIO()
        logs.show(lambda: out, prefix="[trial 7] ", alone=True)
        logs.show(lambda: out, prefix="[trial 7] ", alone=True)  # a second call replaces the first handler
        logging.getLogger("pipeline.verbs.runs").info("training 5 shards")
        assert out.getvalue() == "[trial 7] training 5 shards\n" and at_root.getvalue() == ""
        assert len(_shown_handlers()) == 1
        logs.show(lambda: out, logging.WARNING)  # the CLI with --quiet: warnings only, and root handlers still see them
        logging.getLogger("pipeline.verbs.runs").info("hidden")
        logging.getLogger("pipeline.verbs.runs").warning("a warning")
        assert out.getvalue().endswith("training 5 shards\na warning\n") and "a warning" in at_root.getvalue()
    finally:
        python_root.removeHandler(root_handler)
        package.handlers[:], package.level, package.propagate = saved
