"""LiRA against a run (`dpsisa evaluate --attack lira --reference-models K`): the product trains the
reference models itself and attacks the run's live ensemble with them (`pipeline/lira.py`).

Reference model j is a SISA ensemble with the target's config (shards, slices, DP recipe, strategy;
its own seed) trained through the normal `runs.train` path (its shards run as Ray actors in parallel)
on a random half of the private pool: models 2j and 2j+1 take complementary halves, so with even K
every example is "in" for K/2 of them. They live in `<run>/lira/ref-<j>` (or `--reference-dir`) and
are reused when they exist: asking for more models later trains only the missing ones. They are not
tracked in MLflow (no registered model per reference): the `evaluate` run that uses them logs the attack.

Members are the ids the live version trained on. Non-members, best: the private ids the run left out
because it was trained with `data.keep_half=SEED` (a random half, like its references: members and
non-members then come from the same pool and the online attack applies). Otherwise the test split:
every reference model is "out" on it, which is all the offline attack needs; online needs "in"
models for non-members too, so it is reported only for a `data.keep_half` target. A target trained
on the whole pool sees twice as much data as its references: the attack is then conservative.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline import attacks, lira
from pipeline.config import Config
from pipeline.data import datasets
from pipeline.data.datasets import Data
from pipeline.errors import UserError
from pipeline.rundir import RunDir, open_run
from pipeline.unlearning import logit_scaled_confidence

SAMPLES = 2000  # members and non-members attacked (each side, at most)
REFERENCE_SEED = 10_000  # reference j trains with seed config.seed + REFERENCE_SEED + j
HALVES_SEED = 20_000  # the halves' coins: seed config.seed + HALVES_SEED
FREE_KEYS = ("seed", "data.keep_half", "tracking.enabled", "tracking.experiment", "tracking.uri",
             "tracking.registered_model")  # may differ between a target and its reference models


class LiraError(UserError, ValueError):
    """The LiRA request is impossible (too few reference models, a reference that does not match)."""


def check_count(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < lira.MIN_REFERENCES:
        raise LiraError(f"--reference-models must be an integer, at least {lira.MIN_REFERENCES} (got {k!r}); "
                        f"online LiRA needs at least {lira.MIN_ONLINE_REFERENCES}.")


def default_dir(run: RunDir) -> str:
    return f"{run.uri}/lira"


def _matches(target: Config, reference: Config) -> list[str]:
    a, b = target.flat(), reference.flat()
    return sorted(k for k in set(a) | set(b) if k not in FREE_KEYS and a.get(k) != b.get(k))


def ensure(run: RunDir, config: Config, k: int, reference_dir: str | None, log: Callable[[str], None]) -> list[RunDir]:
    """The K reference runs: reused where `<reference_dir>/ref-<j>` holds a matching run, trained otherwise."""
    from pipeline import runs  # runs imports this module's users; keep the import graph one way at load time

    check_count(k)
    base = (reference_dir or default_dir(run)).rstrip("/")
    n_private = int(len(datasets.load(config.data).private.y))
    halves = lira.paired_halves(k, n_private, config.seed + HALVES_SEED)
    references = []
    for j in range(k):
        ref = RunDir(f"{base}/ref-{j}")
        if ref.is_run():
            differs = _matches(config, ref.config())
            if differs:
                raise LiraError(f"{ref.uri} is a reference run for another config ({', '.join(differs[:4])} differ); "
                                "choose another --reference-dir.")
            ref.summary()  # a training that never finished is refused with its own message
            log(f"LiRA: reusing reference model {j + 1}/{k} in {ref.uri}")
        else:
            log(f"LiRA: training reference model {j + 1}/{k} on a random half of the pool in {ref.uri}")
            ref_config = config.with_overrides({"seed": config.seed + REFERENCE_SEED + j, "data.keep_half": None,
                                                "tracking.enabled": False})  # the evaluate run logs the attack
            runs.train(ref_config, ref, log=log, exclude_ids=np.flatnonzero(~halves[j]).tolist())
        references.append(ref)
    return references


def target_split(run: RunDir, data: Data, seed: int, samples: int = SAMPLES) -> tuple[np.ndarray, np.ndarray, bool]:
    """(member ids, non-member ids, non-members are private ids): a balanced sample of each side."""
    from pipeline import runs

    members, _ = runs.trained_ids(run)
    assigned = run.ledger().assignments()["sample_id"].to_numpy()
    left_out = np.setdiff1d(data.private.ids, assigned)
    private = len(left_out) >= 2
    pool = left_out if private else data.test.ids
    n = min(samples, len(members), len(pool))
    members, nonmembers = attacks.balanced_sample(members, pool, n, seed)
    return members, nonmembers, private


def _phi(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return logit_scaled_confidence(probs, labels)


def attack(target_probs: Callable[[np.ndarray], np.ndarray], run: RunDir, data: Data, references: list[RunDir],
           seed: int, log: Callable[[str], None], samples: int = SAMPLES) -> dict:
    """Offline (and, for a `data.keep_half` target with K ≥ 4, online) LiRA on the live ensemble."""
    from pipeline import runs

    members, nonmembers, private = target_split(run, data, seed, samples)
    x = np.concatenate([data.private.x[members], (data.private.x if private else data.test.x)[nonmembers]])
    y = np.concatenate([data.private.y[members], (data.private.y if private else data.test.y)[nonmembers]])
    is_member = np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)]
    target = _phi(target_probs(x), y)
    ids = np.concatenate([members, nonmembers])
    ref_phi, ref_in = [], []
    for j, ref in enumerate(references):
        log(f"LiRA: scoring {len(ids)} examples with reference model {j + 1}/{len(references)}")
        ref_phi.append(_phi(runs.predict(ref, {"x": x}, log=lambda _: None)["x"], y))
        trained = open_run(ref.uri).ledger().assignments()["sample_id"].to_numpy()
        ref_in.append(np.where(is_member | private, np.isin(ids, trained), False))
    ref_phi, ref_in = np.stack(ref_phi), np.stack(ref_in)
    out = {"reference_models": len(references), "reference_dir": references[0].uri.rsplit("/", 1)[0],
           "nonmembers_from": "private (data.keep_half)" if private else "test",
           "fixed_variance": len(references) < 2 * lira.GLOBAL_VARIANCE_BELOW}
    variants = ["offline"] + (["online"] if private and len(references) >= lira.MIN_ONLINE_REFERENCES else [])
    for variant in variants:
        scores = lira.lira_scores(target, ref_phi, ref_in, online=variant == "online")
        scored = ~np.isnan(scores)
        out[variant] = {**lira.attack_summary(scores[scored & is_member], scores[scored & ~is_member]),
                        "unscored": int((~scored).sum())}
    if "online" not in out:
        out["online"] = None
        out["online_skipped"] = (f"online LiRA needs K ≥ {lira.MIN_ONLINE_REFERENCES}" if private else
                                 "online LiRA needs non-members from the private pool: train the target with data.keep_half=SEED")
    return out
