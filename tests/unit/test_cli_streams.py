"""stdout carries a command's result alone: what libraries (MLflow's run links) and Ray's log
forwarding write to sys.stdout while a command runs goes to stderr."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from pipeline.verbs.results import Stopped

cli_main = importlib.import_module("pipeline.cli.main")  # the module (pipeline.cli.main is also its function)


def test_while_a_command_runs_other_writes_to_stdout_go_to_stderr_and_stdout_holds_the_one_json_object(monkeypatch, capsys):
    def command(args: argparse.Namespace) -> None:
        print("🏃 View run forget at: http://127.0.0.1:5000/#/experiments/1/runs/x")  # as MLflow does
        sys.stdout.write("(Coordinator pid=1) worker output\n")  # as Ray's log forwarding does
        cli_main._print(Stopped(run_dir="r", actors_stopped=3), True)

    def parser() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser()
        p.set_defaults(func=command, command="fake")
        return p

    monkeypatch.setattr(cli_main, "parser", parser)
    stdout = sys.stdout
    cli_main.main([])
    out, err = capsys.readouterr()
    assert json.loads(out) == {"run_dir": "r", "actors_stopped": 3} and out.count("\n") == 1
    assert "View run" in err and "worker output" in err
    assert sys.stdout is stdout  # restored after the command


def test_progress_from_module_loggers_goes_to_stderr_and_quiet_keeps_only_warnings(monkeypatch, capsys):
    import logging

    def command(args: argparse.Namespace) -> None:
        logging.getLogger("pipeline.verbs.runs").info("training 2 shards")  # a verb's progress
        logging.getLogger("pipeline.sisa.coordinator.session").warning("the coordinator is retrying")
        cli_main._print(Stopped(run_dir="r", actors_stopped=3), True)

    for quiet in (False, True):
        def parser(quiet: bool = quiet) -> argparse.ArgumentParser:
            p = argparse.ArgumentParser()
            p.set_defaults(func=command, command="fake", quiet=quiet)
            return p

        monkeypatch.setattr(cli_main, "parser", parser)
        cli_main.main([])
        out, err = capsys.readouterr()
        assert json.loads(out) == {"run_dir": "r", "actors_stopped": 3}
        assert ("training 2 shards" in err) is not quiet
        assert err.count("the coordinator is retrying") == 1  # shown once, also with --quiet; never on stdout


def test_sweep_json_goes_to_stdout_alone(monkeypatch, capsys):
    from pipeline.sweep import runner

    result = {"parent_run_id": None, "table": [], "best": [], "storage_path": "/tmp/s", "errors": [], "unfinished": []}
    monkeypatch.setattr(runner, "run_sweep", lambda *args, **kwargs: result)  # the Tune run itself: integration tests
    cli_main.main(["sweep", "jobs/configs/sweep_digits.yaml", "--json"])
    out, _ = capsys.readouterr()
    assert json.loads(out) == result and out.count("\n") == 1
