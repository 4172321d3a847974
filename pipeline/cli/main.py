"""`dpsisa train|forget|evaluate|verify|status|predict|stop|score|baselines|unlearnable|audit|sweep|demo`:
progress on stderr, summaries on stdout.

Errors print one line — the cause and the fix — to stderr and exit non-zero.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from pipeline import config as config_mod
from pipeline.logs import show as show_messages

logger = logging.getLogger(__name__)

EXIT_USAGE, EXIT_INPUT, EXIT_FAILURE = 2, 3, 4


def _ids(args: argparse.Namespace) -> list[int]:
    from pipeline.storage.ledger import ForgetRequestError, parse_ids

    if args.ids_file:
        path = Path(args.ids_file)
        if not path.is_file():
            raise ForgetRequestError(f"--ids-file {path} not found.")
        return parse_ids(path.read_text(), source=f"--ids-file {path}")
    return parse_ids(args.ids, source="--ids")


def _subjects(args: argparse.Namespace) -> list[str]:
    from pipeline.data.subject_lists import SubjectError, parse_subjects

    if args.subjects_file:
        path = Path(args.subjects_file)
        if not path.is_file():
            raise SubjectError(f"--subjects-file {path} not found.")
        return parse_subjects(path.read_text(), source=f"--subjects-file {path}")
    return parse_subjects(args.subject, source="--subject")


_RESULT = [sys.stdout]  # the command's result (the demo's summary too) goes to the real stdout, set by main()


def _print(result, as_json: bool) -> None:
    """A verb's typed result on stdout: one JSON object (`to_dict`) with --json, else its `human` summary."""
    text = json.dumps(result.to_dict(), default=str) if as_json else result.human()
    print(text, file=_RESULT[0], flush=True)


def cmd_train(args: argparse.Namespace) -> None:
    from pipeline.verbs import runs

    config = config_mod.load(args.config, args.overrides)
    run_dir = runs.resolve_run_dir(args.run_dir, config)
    logger.info(f"run directory: {run_dir}")
    summary = runs.train(config, run_dir, keep_alive=args.keep_alive)
    _print(summary, args.json)


def cmd_forget(args: argparse.Namespace) -> None:
    from pipeline.verbs import runs

    by_subject = args.subject is not None or args.subjects_file is not None
    ids, subjects = (None, _subjects(args)) if by_subject else (_ids(args), None)
    if args.each and not (by_subject and args.no_wait):
        raise runs.RunError("--each (one request per subject) needs --subject/--subjects-file and --no-wait; follow each "
                       "request with `dpsisa request --id ID --wait`.")
    if args.no_wait:
        submitted = runs.submit(runs.resolve_run_dir(args.run_dir), ids, subjects=subjects, each=args.each)
        _print(submitted, args.json)
        return
    result = runs.forget(runs.resolve_run_dir(args.run_dir), ids, subjects=subjects, timeout_s=args.timeout)
    _print(result, args.json)


def cmd_request(args: argparse.Namespace) -> None:
    from pipeline.verbs import runs

    result = runs.request_status(runs.resolve_run_dir(args.run_dir), args.id, wait=args.wait,
                                 timeout_s=args.timeout)
    _print(result, args.json)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from pipeline.errors import UserError
    from pipeline.verbs import runs

    if args.attack == "lira" and args.reference_models is None:
        raise UserError("--attack lira needs --reference-models K (K ≥ 2; online LiRA needs K ≥ 4).")
    if args.attack != "lira" and (args.reference_models is not None or args.reference_dir is not None):
        raise UserError("--reference-models and --reference-dir go with --attack lira.")
    _print(runs.evaluate_run(runs.resolve_run_dir(args.run_dir), reference_models=args.reference_models,
                             reference_dir=args.reference_dir), args.json)


def cmd_verify(args: argparse.Namespace) -> None:
    from pipeline.verbs import runs

    result = runs.verify(runs.resolve_run_dir(args.run_dir), args.all)
    _print(result, args.json)
    if not result.exact:
        sys.exit(EXIT_FAILURE)


def cmd_status(args: argparse.Namespace) -> None:
    from pipeline.verbs import runs

    if args.subject is not None:
        from pipeline.data.subject_lists import parse_subjects

        (subject,) = parse_subjects(args.subject, source="--subject")[:1]
        _print(runs.subject_status(runs.resolve_run_dir(args.run_dir), subject), args.json)
        return
    _print(runs.status(runs.resolve_run_dir(args.run_dir)), args.json)


def cmd_predict(args: argparse.Namespace) -> None:
    import numpy as np

    from pipeline.verbs import runs

    path = Path(args.input)
    try:
        images = np.load(path, allow_pickle=False)  # never unpickle a user's file
    except (OSError, ValueError) as exc:
        raise runs.RunError(f"--input {path} is not a readable .npy array ({exc}); save images with numpy.save.") from None
    _print(runs.serve(runs.resolve_run_dir(args.run_dir), images), args.json)


def cmd_stop(args: argparse.Namespace) -> None:
    from pipeline.verbs import runs

    _print(runs.stop(runs.resolve_run_dir(args.run_dir)), args.json)


def cmd_score(args: argparse.Namespace) -> None:
    from pipeline.verbs import runs, scoring

    config = config_mod.load(args.config, args.overrides)
    out_dir = runs.resolve_local_dir(args.out_dir or f"scores/{runs.resolve_local_dir(None, config).name}")
    logger.info(f"scoring SISA unlearning in {out_dir}")
    _print(scoring.run_score(config, out_dir, args.k, args.forget_count, permutations=args.permutations), args.json)


def cmd_baselines(args: argparse.Namespace) -> None:
    from pipeline.baselines import report, runner
    from pipeline.tracking import groups
    from pipeline.verbs import runs

    config = config_mod.load(args.config, args.overrides)
    methods = runner.parse_methods(args.methods)
    fractions = runner.parse_fractions(args.forget_fractions)
    out_dir = runs.resolve_local_dir(args.out_dir or f"baselines/{runs.resolve_local_dir(None, config).name}")
    logger.info(f"comparing {len(methods)} unlearning method(s) in {out_dir}")
    with groups.group("baselines", config, out_dir) as run:
        result = runner.run_comparison(config, out_dir, methods, count=args.forget, fraction=args.forget_fraction,
                                       forget_class=args.forget_class, k=args.k, fractions=fractions)
        payload = result.to_dict(with_run_id=False)  # what comparison.json and the MLflow run hold
        paths = report.write(payload, out_dir)
        result = dataclasses.replace(result, mlflow_run_id=report.log_mlflow(run, payload, paths))
    _print(result, args.json)


def cmd_unlearnable(args: argparse.Namespace) -> None:
    from pipeline.baselines import unlearnable

    config = config_mod.load(args.config, args.overrides)
    from pipeline.baselines.runner import parse_fractions

    fractions = unlearnable.check_fractions(parse_fractions(args.fractions, "--fractions", closed=True))
    _print(unlearnable.run_unlearnable(config, fractions), args.json)


def cmd_audit(args: argparse.Namespace) -> None:
    from pipeline.verbs import audit, audit_whitebox, runs

    if args.white_box and args.skip_clean:
        from pipeline.errors import UserError

        raise UserError("--skip-clean goes with the black-box audit (the white-box audit trains no clean model); drop one.")
    config = config_mod.load(args.config, args.overrides)
    run_dir = runs.resolve_local_dir(args.run_dir or f"audits/{runs.resolve_local_dir(None, config).name}")
    if args.white_box:
        canaries = audit_whitebox.DEFAULT_CANARIES if args.canaries is None else args.canaries
        result = audit_whitebox.run_whitebox_audit(config, canaries, run_dir=run_dir)
        _print(result, args.json)
        return
    canaries = audit.DEFAULT_CANARIES if args.canaries is None else args.canaries
    result = audit.run_audit(config, canaries, run_dir=run_dir, compare_clean=not args.skip_clean)
    _print(result, args.json)


def cmd_sweep(args: argparse.Namespace) -> None:
    from pipeline import sweep

    status = sweep.command(args, out=_RESULT[0])  # the table and best strategies (or --json); 4 when trials failed
    if status:
        sys.exit(status)


def cmd_demo(args: argparse.Namespace) -> None:
    from pipeline.cli.demo import demo

    demo(args.config, args.overrides, args.run_dir, out=_RESULT[0])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpsisa", description="SISA exact unlearning with DP finetuning on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    def output_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--json", action="store_true", help="print one JSON object")
        sp.add_argument("--quiet", action="store_true", help="no progress messages")

    def add(name: str, func, help_text: str, run_dir_required: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text)
        sp.set_defaults(func=func)
        sp.add_argument("--run-dir", required=run_dir_required, help="run directory (relative: under $DPSISA_HOME or cwd)")
        output_flags(sp)
        return sp

    train = add("train", cmd_train, "train a SISA ensemble", run_dir_required=False)
    train.add_argument("config", help="YAML config, e.g. jobs/configs/fmnist.yaml")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. shards.count=10")
    train.add_argument("--keep-alive", action="store_true", help="leave detached, named shard actors running")
    forget = add("forget", cmd_forget, "forget sample ids (exact unlearning)")
    ids = forget.add_mutually_exclusive_group(required=True)
    ids.add_argument("--ids", help="comma-separated sample ids")
    ids.add_argument("--ids-file", help="file of ids, comma- or newline-separated")
    ids.add_argument("--subject", help="data subject id(s), comma-separated: erase everything they own")
    ids.add_argument("--subjects-file", help="file of subject ids, comma- or newline-separated")
    forget.add_argument("--no-wait", action="store_true",
                        help="return once the request is recorded (pending); `dpsisa request --id ID --wait` follows it")
    forget.add_argument("--each", action="store_true",
                        help="with --subject(s) and --no-wait: one request per subject, all recorded at once")
    request = add("request", cmd_request, "status (and receipt) of one forget request; --wait until it is done")
    request.add_argument("--id", required=True, help="the request id printed by forget")
    request.add_argument("--wait", action="store_true", help="wait until the request is done")
    for sp in (forget, request):
        sp.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="give up waiting after S seconds (exit 4; the request stays recorded); default ray.wait_timeout_s")
    evaluate = add("evaluate", cmd_evaluate, "test accuracy and privacy of the live ensemble")
    evaluate.add_argument("--attack", choices=("population", "lira"), default="population",
                          help="population: posterior/loss/logistic attacks (always run); lira: also LiRA with reference models")
    evaluate.add_argument("--reference-models", type=int, help="K reference runs for LiRA (≥ 2; online needs ≥ 4)")
    evaluate.add_argument("--reference-dir", help="where reference runs live or are trained (default RUN_DIR/lira); reused")
    verify = add("verify", cmd_verify, "prove unlearning exact: retrain touched shards from scratch, compare bitwise")
    verify.add_argument("--all", action="store_true", help="check every shard, not only those touched by a forget")
    status = add("status", cmd_status, "shards, versions, requests, ε")
    status.add_argument("--subject", help="where this data subject's samples are and which model versions saw them")
    predict = add("predict", cmd_predict, "classes and probabilities of the live (unlearned) ensemble")
    predict.add_argument("--input", required=True, help="X.npy: float32 images normalised like the data loader's, or raw uint8")
    add("stop", cmd_stop, "stop the shard actors that `train --keep-alive` left running")
    score = sub.add_parser("score", help="NeurIPS-2023 unlearning score: K unlearned vs K retrained ensembles")
    score.set_defaults(func=cmd_score)
    score.add_argument("config", help="YAML config, e.g. jobs/configs/digits.yaml")
    score.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    score.add_argument("--k", type=int, default=3, help="ensembles per group (trains 2K; default 3)")
    score.add_argument("--forget-count", type=int, default=20, help="random ids to forget (default 20)")
    score.add_argument("--permutations", type=int, default=200,
                       help="random relabellings of the 2K models for the at-chance baseline and p-value (0: skip)")
    score.add_argument("--out-dir", default=None, help="directory for the 2K runs (relative: under $DPSISA_HOME or cwd)")
    output_flags(score)
    baselines = sub.add_parser("baselines", help="unlearning methods side by side (exact, certified, approximate)")
    baselines.set_defaults(func=cmd_baselines)
    baselines.add_argument("config", help="YAML config, e.g. jobs/configs/baselines_fmnist.yaml")
    baselines.add_argument("overrides", nargs="*", help="key=value overrides, e.g. baselines.frequent_epochs=50")
    what = baselines.add_mutually_exclusive_group(required=True)
    what.add_argument("--forget", type=int, default=None, help="forget N random private ids")
    what.add_argument("--forget-fraction", type=float, default=None, help="forget this fraction of the private ids, in (0, 1)")
    what.add_argument("--forget-class", type=int, default=None, help="forget every private sample of class C")
    baselines.add_argument("--methods", default=None, help="comma-separated methods (default: all registered)")
    baselines.add_argument("--k", type=int, default=2, help="runs per method and oracle retrains, seeds s..s+K-1 (default 2)")
    baselines.add_argument("--forget-fractions", default=None, help="deletion-rate curve, e.g. 0.001,0.01,0.05,0.1")
    baselines.add_argument("--out-dir", default=None, help="output folder (relative: under $DPSISA_HOME or cwd)")
    output_flags(baselines)
    audit = add("audit", cmd_audit, "one-run canary audit: a 95%% lower bound on ε from one training run", run_dir_required=False)
    audit.add_argument("config", help="YAML config, e.g. jobs/configs/audit_digits.yaml")
    audit.add_argument("overrides", nargs="*", help="key=value overrides, e.g. privacy.epsilon=2")
    audit.add_argument("--canaries", type=int, default=None,
                       help="canaries M, each included with probability 1/2 (default 200; 1000 with --white-box)")
    audit.add_argument("--skip-clean", action="store_true", help="skip the second training without canaries (accuracy cost)")
    audit.add_argument("--white-box", action="store_true",
                       help="white-box audit of the DP step: gradient canaries in shard 0's training, seen at every step")
    unlearnable = sub.add_parser("unlearnable", help="unlearnable examples: clean-test accuracy as the protected fraction grows")
    unlearnable.set_defaults(func=cmd_unlearnable)
    unlearnable.add_argument("config", help="YAML config, e.g. jobs/configs/baselines_fmnist.yaml")
    unlearnable.add_argument("overrides", nargs="*", help="key=value overrides")
    unlearnable.add_argument("--fractions", default="0,0.2,0.4,0.6,0.8,1", help="protected fractions (default 0,0.2,...,1)")
    output_flags(unlearnable)
    sweep = sub.add_parser("sweep", help="Ray Tune sweep of whole experiments (MLflow parent run, one child per trial)")
    sweep.set_defaults(func=cmd_sweep)
    sweep.add_argument("config", help="sweep YAML, e.g. jobs/configs/sweep_digits.yaml")
    sweep.add_argument("overrides", nargs="*", help="key=value overrides of the base config, e.g. train.epochs=1")
    sweep.add_argument("--resume", action="store_true", help="continue an interrupted sweep (errored trials start over)")
    sweep.add_argument("--json", action="store_true", help="print one JSON object (progress on stderr)")
    demo = sub.add_parser("demo", help="the whole story on Fashion-MNIST in a few minutes")
    demo.set_defaults(func=cmd_demo)
    demo.add_argument("--config", default=None, help="config (default jobs/configs/fmnist.yaml)")
    demo.add_argument("--run-dir", default=None)
    demo.add_argument("overrides", nargs="*")
    return p


def main(argv: list[str] | None = None) -> None:
    from pipeline.errors import RecoverableError, UserError

    args = parser().parse_args(argv)
    _RESULT[0], sys.stdout = sys.stdout, sys.stderr  # stdout: the result alone; Ray's forwarded worker output → stderr
    show_messages(lambda: sys.stderr, logging.WARNING if getattr(args, "quiet", False) else logging.INFO)  # progress
    try:
        args.func(args)
    except UserError as exc:
        print(f"dpsisa {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except RecoverableError as exc:  # a shard actor that died for good: one line, not a traceback
        print(f"dpsisa {args.command}: failed: {exc}." + (f" {exc.hint}" if exc.hint else ""), file=sys.stderr)
        sys.exit(exc.exit_code)
    finally:
        sys.stdout = _RESULT[0]


if __name__ == "__main__":
    main()
