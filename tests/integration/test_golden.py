"""Golden JSON: the key sets and seeded values of the verbs' `--json` output on digits, recorded
before the layout moves (issue 18) so "behaviour unchanged" is checked, not hoped.

Each verb runs once through `dpsisa ... --json` (in process, real Ray, MLflow, Parquet). Its output
is flattened to dotted paths; every recorded key must still be there (new keys are fine), and every value that is a
function of the seed (accuracies, ε, σ, shards, versions, counts) must equal the recorded value
(floats to 1e-6 relative). Times, paths, request ids and timestamps are volatile and only their keys
are compared. To re-record after a deliberate change: `DPSISA_GOLDEN_RECORD=1 pytest tests/integration/test_golden.py`,
and say in the commit which values moved and why.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest

from pipeline import cli

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "digits.json"
DIGITS = "jobs/configs/digits.yaml"
RECORD = os.environ.get("DPSISA_GOLDEN_RECORD") == "1"

# Keys whose values are not a function of the seed (clock, storage location, fresh ids).
VOLATILE = re.compile(r"(seconds|_s$|time|_at$|^at$|duration|speedup|run_dir|uri|path|dir$|request_id|requests\.\d+$|"
                      r"batch\.\d+|run_id|timestamp|throughput|per_hour|started|finished|mlflow|tracking|experiment|"
                      r"version_uri|out_dir|created|lease|host|pid|node|sha256|digest|receipt\.issued|work_fraction|"
                      r"samples_processed|full_train)", re.IGNORECASE)


def flatten(value, prefix: str = "") -> dict[str, object]:
    """Dotted paths to leaves; lists of scalars are one leaf, lists of dicts are indexed."""
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        out = {}
        for i, item in enumerate(value):
            out.update(flatten(item, f"{prefix}.{i}"))
        return out
    return {prefix: value}


def _volatile(path: str) -> bool:
    return any(VOLATILE.search(part) for part in path.split(".")) or bool(VOLATILE.search(path))


FRESH = [(re.compile(r"\d{8}T\d{6}-[0-9a-f]{8}"), "<request id>"), (re.compile(r"dpsisa-run-[0-9a-f]{8}"), "dpsisa-run-<id>")]


def _normalised(value):
    """Fresh names (request ids, registered model names) replaced by placeholders; the rest as is."""
    if isinstance(value, str):
        for pattern, placeholder in FRESH:
            value = pattern.sub(placeholder, value)
        return value
    if isinstance(value, list):
        return [_normalised(v) for v in value]
    return value


def summary(result: dict) -> dict:
    flat = flatten(result)
    return {"keys": sorted(flat), "values": {k: _normalised(v) for k, v in sorted(flat.items()) if not _volatile(k)}}


# The baselines' distances (KL, L2 to the oracle) are float32 sums computed in reused Ray worker
# processes, and MKL's kernels may sum in another order depending on the buffers' alignment: they
# moved by up to 2e-6 relative with the test order (pytest-xdist). Their tolerance is 1e-5; the
# rest, 1e-6.
REL_TOL = {"baselines": 1e-5}


def _equal(a, b, rel_tol: float = 1e-6) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None or isinstance(a, (str, list)) or isinstance(b, (str, list)):
            return a == b
        return math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=1e-9) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y, rel_tol) for x, y in zip(a, b))
    return a == b


def differences(recorded: dict, now: dict, rel_tol: float = 1e-6) -> list[str]:
    out = []
    missing = sorted(set(recorded["keys"]) - set(now["keys"]))  # new keys are fine (additive); a gone key is not
    out += [f"key gone: {k}" for k in missing]
    for key, value in recorded["values"].items():
        if key in now["values"] and not _equal(value, now["values"][key], rel_tol):
            out.append(f"{key}: recorded {value!r}, now {now['values'][key]!r}")
    return out


def _json_of(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    cli.main(argv)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_verbs_json_matches_the_golden_record(ray_2cpu, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parent.parent.parent)
    run = str(tmp_path / "run")
    got = {}
    got["train"] = _json_of(capsys, ["train", DIGITS, "--run-dir", run, "--json", "--quiet"])
    got["forget"] = _json_of(capsys, ["forget", "--run-dir", run, "--ids", "3,5,8", "--json", "--quiet"])
    got["request"] = _json_of(capsys, ["request", "--run-dir", run, "--id", got["forget"]["request_id"], "--json", "--quiet"])
    got["status"] = _json_of(capsys, ["status", "--run-dir", run, "--json", "--quiet"])
    got["verify"] = _json_of(capsys, ["verify", "--run-dir", run, "--json", "--quiet"])
    cli.main(["stop", "--run-dir", run, "--quiet"])
    got["audit"] = _json_of(capsys, ["audit", "jobs/configs/audit_digits.yaml", "shards.count=1", "shards.slices=1",
                                     "train.epochs=2", "--canaries", "20", "--skip-clean", "--run-dir", str(tmp_path / "audit"),
                                     "--json", "--quiet"])
    got["baselines"] = _json_of(capsys, ["baselines", "jobs/configs/baselines_digits.yaml", "train.epochs=4", "--forget", "5",
                                         "--k", "1", "--methods", "retrain,finetune,sisa", "--out-dir", str(tmp_path / "baselines"),
                                         "--json", "--quiet"])
    now = {verb: summary(result) for verb, result in got.items()}
    if RECORD:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(now, indent=1, sort_keys=True, default=str) + "\n")
        pytest.skip(f"recorded {GOLDEN}")
    recorded = json.loads(GOLDEN.read_text())
    problems = {verb: differences(recorded[verb], json.loads(json.dumps(now[verb], default=str)), REL_TOL.get(verb, 1e-6))
                for verb in recorded}
    assert not {verb: p for verb, p in problems.items() if p}, json.dumps(problems, indent=1)
