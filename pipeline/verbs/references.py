"""LiRA against a run (`dpsisa evaluate --attack lira --reference-models K`): the product trains the
reference models itself and attacks the run's live ensemble with them (`pipeline/lira.py`).

Reference model j is a SISA ensemble with the target's config (shards, slices, DP recipe, strategy;
its own seed, the target's public pretrained model) trained through the normal `runs.train` path
(its shards run as Ray actors in parallel) on a random half of the private pool: models 2j and 2j+1
take complementary halves, so with even K every example is "in" for K/2 of them. They live in
`<run>/lira/ref-<j>` (or `--reference-dir`) and are reused when they exist: asking for more models
later trains only the missing ones. They are not tracked in MLflow (no registered model per
reference): the `evaluate` run that uses them logs the attack.

Members are the ids the live version trained on. Non-members, best: the private ids the run left out
because it was trained with `data.keep_half=SEED` (a random half, like its references: members and
non-members then come from the same pool and the online attack applies). Otherwise the test split:
every reference model is "out" on it, which is all the offline attack needs; online needs "in"
models for non-members too, so it is reported only for a `data.keep_half` target. A target trained
on the whole pool sees twice as much data as its references: the attack is then conservative.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import Config
from pipeline.core import pretrain
from pipeline.core.train import predict_logits
from pipeline.data import datasets
from pipeline.data.datasets import Data
from pipeline.errors import UserError
from pipeline.evaluation import attacks, lira
from pipeline.evaluation.unlearning import logit_confidence_from_logits
from pipeline.storage.rundir import RunDir, trained_ids
from pipeline.tracking import registry

logger = logging.getLogger(__name__)

SAMPLES = 2000  # members and non-members attacked (each side, at most)
REFERENCE_SEED = 10_000  # reference j trains with seed config.seed + REFERENCE_SEED + j
HALVES_SEED = 20_000  # the halves' coins: seed config.seed + HALVES_SEED
FREE_KEYS = ("seed", "pretrain.seed", "data.keep_half", "tracking.enabled", "tracking.experiment", "tracking.uri",
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


def ensure(run: RunDir, config: Config, k: int, reference_dir: str | None,
           train: Callable[..., object]) -> list[RunDir]:
    """The K reference runs: reused where `<reference_dir>/ref-<j>` holds a matching run, trained otherwise
    with `train(config, run_dir, exclude_ids=...)` (the `train` verb, passed in by its caller)."""

    check_count(k)
    base = (reference_dir or default_dir(run)).rstrip("/")
    halves = None  # the data set is loaded only when a reference must be trained
    references = []
    for j in range(k):
        ref = RunDir(f"{base}/ref-{j}")
        if ref.is_run():
            differs = _matches(config, ref.config())
            if differs:
                raise LiraError(f"{ref.uri} is a reference run for another config ({', '.join(differs[:4])} differ); "
                                "choose another --reference-dir.")
            ref.summary()  # a training that never finished is refused with its own message
            logger.info(f"LiRA: reusing reference model {j + 1}/{k} in {ref.uri}")
        else:
            logger.info(f"LiRA: training reference model {j + 1}/{k} on a random half of the pool in {ref.uri}")
            if halves is None:
                halves = lira.paired_halves(k, len(datasets.load(config.data).private.y), config.seed + HALVES_SEED)
            ref_config = config.with_overrides({  # one public model for all; the evaluate run logs the attack
                "seed": config.seed + REFERENCE_SEED + j, "pretrain.seed": pretrain.seed(config), "data.keep_half": None,
                "tracking.enabled": False})
            train(ref_config, ref, exclude_ids=np.flatnonzero(~halves[j]).tolist())
        references.append(ref)
    return references


@dataclass(frozen=True)
class Probe:
    """The examples LiRA attacks: a balanced sample of members and non-members of the target."""
    ids: np.ndarray  # private ids (test ids for test non-members)
    x: np.ndarray
    y: np.ndarray
    is_member: np.ndarray
    private: bool  # non-members are private ids the target left out (data.keep_half), not test images


def probe(run: RunDir, data: Data, seed: int, samples: int = SAMPLES) -> Probe:
    """Members: ids the live version trained on. Non-members: private ids it left out, else test ids."""
    members, _ = trained_ids(run)
    assigned = run.ledger().assignments()["sample_id"].to_numpy()
    left_out = np.setdiff1d(data.private.ids, assigned)
    private = len(left_out) >= 2
    source = data.private if private else data.test
    n = min(samples, len(members), len(left_out) if private else len(data.test.ids))
    members, nonmembers = attacks.balanced_sample(members, left_out if private else data.test.ids, n, seed)
    return Probe(ids=np.concatenate([members, nonmembers]),
                 x=np.concatenate([data.private.x[members], source.x[nonmembers]]),
                 y=np.concatenate([data.private.y[members], source.y[nonmembers]]),
                 is_member=np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)], private=private)


def live_logits(run: RunDir, x: np.ndarray) -> np.ndarray:
    """(S, N, C) float64 logits of a run's committed (live) shard models, computed in this process (pure torch):
    no actor needs to start, and φ comes from logits, not from float32 probabilities that saturate."""
    members = registry.live_members(run.config(), run)
    inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return np.stack([predict_logits(m, inputs).numpy() for m in members])


def attack(target: Probe, target_run: RunDir, references: list[RunDir]) -> dict:
    """Offline (and, for a `data.keep_half` target with K ≥ 4, online) LiRA on the live ensemble of `target_run`
    for `target`'s examples. Every model's φ (target and references) is the mean-softmax ensemble's log-odds of
    the label, computed from logits in float64 (`unlearning.logit_confidence_from_logits`)."""
    phi = logit_confidence_from_logits(live_logits(target_run, target.x), target.y)
    ref_phi, ref_in = [], []
    for j, ref in enumerate(references):
        logger.info(f"LiRA: scoring {len(target.ids)} examples with reference model {j + 1}/{len(references)}")
        ref_phi.append(logit_confidence_from_logits(live_logits(ref, target.x), target.y))
        trained = ref.ledger().assignments()["sample_id"].to_numpy()
        ref_in.append((target.is_member | target.private) & np.isin(target.ids, trained))  # test ids: never trained on
    ref_phi, ref_in = np.stack(ref_phi), np.stack(ref_in)
    is_member = target.is_member
    out = {"reference_models": len(references), "reference_dir": references[0].uri.rsplit("/", 1)[0],
           "nonmembers_from": "private (data.keep_half)" if target.private else "test",
           "fixed_variance": lira.uses_fixed_variance(len(references))}
    online = target.private and len(references) >= lira.MIN_ONLINE_REFERENCES
    for variant in ["offline"] + (["online"] if online else []):
        scores = lira.lira_scores(phi, ref_phi, ref_in, online=variant == "online")
        scored = ~np.isnan(scores)
        out[variant] = {**lira.attack_summary(scores[scored & is_member], scores[scored & ~is_member]),
                        "unscored": int((~scored).sum())}
    if not online:
        out["online"] = None
        out["online_skipped"] = (f"online LiRA needs K ≥ {lira.MIN_ONLINE_REFERENCES}" if target.private else
                                 "online LiRA needs non-members from the private pool: train the target with data.keep_half=SEED")
    return out
