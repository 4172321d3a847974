"""`dpsisa --help` and every command's `--help` render and exit 0 (a stray `%` in a help string
once made `dpsisa --help` end in a TypeError traceback)."""
from __future__ import annotations

import argparse
import importlib

import pytest

cli = importlib.import_module("pipeline.cli.main")  # the module (the package exports its main function)


def _commands() -> list[str]:
    (sub,) = [a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(sub.choices)


@pytest.mark.parametrize("argv", [["--help"], *[[name, "--help"] for name in _commands()]], ids=" ".join)
def test_help_renders_for_the_tool_and_every_command(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert "usage: dpsisa" in captured.out + captured.err


def test_the_verbs_that_do_not_evaluate_load_neither_scipy_nor_scikit_learn():
    """`dpsisa forget`, `status`, `request` (and every `ray job submit` of them) import
    `pipeline.verbs.runs`; the evaluation stack (~1.6 s of imports) loads only in the verbs that use it."""
    import subprocess
    import sys

    probe = ("import sys, pipeline.verbs.runs, pipeline.verbs.queries; "
             "print(sorted(m for m in ('scipy.stats', 'sklearn') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
