"""Audit canaries (Steinke, Nasr & Jagielski 2023): mislabelled test images, each trained on with probability ½.

With `data.canaries = M`, the last M images of the test split become the canary pool: they leave
the test set (never evaluated on) and each gets a seeded random *wrong* label (a mislabelled
canary: nothing but memorisation can fit it, so its loss is the strongest black-box signal). Each
canary is included in the private training set independently with probability ½ (seeded by
`data.canary_seed`); included canaries are appended to the private split with ids n..n+k−1 and
are then partitioned into shards and slices like any sample. Everything is a function of the
data config, so every verb on a run directory sees the same canaries.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.data.split import DataError, Split

MIN_TEST_LEFT = 100  # test samples that must remain for evaluation after the pool is reserved
INCLUSION_PROBABILITY = 0.5  # the one-run analysis assumes independent fair coins


class CanaryCountError(DataError):
    """data.canaries asks for fewer than 2 canaries or more than the test split can spare."""


@dataclass(frozen=True)
class Canaries:
    """The whole pool (included or not), in pool order."""

    x: np.ndarray  # float32 (M, C, H, W), normalised like every split
    label: np.ndarray  # int64 (M,): the seeded wrong label a canary is trained (and scored) on
    true_label: np.ndarray  # int64 (M,): the image's real class (never trained on)
    included: np.ndarray  # bool (M,): in the private training set
    test_ids: np.ndarray  # int64 (M,): positions in the canonical test split (the reserved pool)
    private_ids: np.ndarray  # int64 (M,): private id of an included canary, -1 for an excluded one

    @property
    def count(self) -> int:
        return int(len(self.label))


def capacity(test_size: int) -> int:
    """The largest pool a test split of `test_size` samples can spare."""
    return max(0, test_size - MIN_TEST_LEFT)


def count_problem(count: int, test_size: int) -> str | None:
    """Why `count` canaries are impossible here (a one-line message naming the fix), or None."""
    if count < 2:
        return f"an audit needs at least 2 canaries (got {count}); use a few hundred for a useful bound."
    if count > capacity(test_size):
        return (f"{count} canaries do not fit: the pool is taken from the test split ({test_size} samples) and "
                f"{MIN_TEST_LEFT} must stay for evaluation; use at most {capacity(test_size)} canaries.")
    return None


def draw(true_label: np.ndarray, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(wrong labels, inclusion coins): a uniform label ≠ the true one, and Bernoulli(½) per canary."""
    rng = np.random.default_rng([seed, 4111])
    wrong = (true_label + rng.integers(1, num_classes, size=len(true_label))) % num_classes
    included = rng.random(len(true_label)) < INCLUSION_PROBABILITY
    return wrong.astype(np.int64), included


def reserve(private: Split, test: Split, count: int, seed: int, num_classes: int) -> tuple[Split, Split, Canaries]:
    """(private + included canaries, test − pool, canaries): the hook `datasets.load` calls."""
    problem = count_problem(count, len(test.y))
    if problem:
        raise CanaryCountError(f"data.canaries={count}: {problem}")
    cut = len(test.y) - count
    wrong, included = draw(test.y[cut:], num_classes, seed)
    first = int(private.ids.max()) + 1 if len(private.ids) else 0
    private_ids = np.full(count, -1, np.int64)
    private_ids[included] = first + np.arange(int(included.sum()), dtype=np.int64)
    canaries = Canaries(test.x[cut:], wrong, test.y[cut:], included, test.ids[cut:], private_ids)
    grown = Split(np.concatenate([private.x, canaries.x[included]]), np.concatenate([private.y, wrong[included]]),
                  np.concatenate([private.ids, private_ids[included]]))
    return grown, Split(test.x[:cut], test.y[:cut], test.ids[:cut]), canaries
