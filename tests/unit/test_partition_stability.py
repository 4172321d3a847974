"""The partition and the synthetic subject table do not depend on the data (issue 20, item 1).

Neighbouring data sets D and D ∪ {x} must place every record of D in the same shard and slice, and
give it the same subject: otherwise they differ in many records per shard and per-shard DP does not
compose to (ε, δ) for the ensemble by parallel composition.
"""
import numpy as np
import pytest

from pipeline.data.partition import partition
from pipeline.data.subjects import synthetic_subjects

# D: 600 ids with a few gaps; each x is added to it (an id inside its range, one before it, one after it)
D = np.setdiff1d(np.arange(3, 603, dtype=np.int64), [100, 250, 401])
EXTRA = [250, 0, 5000]


def _cells(columns) -> dict[int, tuple[int, int]]:
    return {int(i): (int(s), int(r)) for i, s, r in zip(columns["sample_id"], columns["shard"], columns["slice"])}


def _slice_orders(columns) -> dict[tuple[int, int], list[int]]:
    orders: dict[tuple[int, int], list[int]] = {}
    for i, s, r in zip(columns["sample_id"].tolist(), columns["shard"].tolist(), columns["slice"].tolist()):
        orders.setdefault((s, r), []).append(i)
    return orders


def _person(ids: np.ndarray) -> np.ndarray:
    """A fixed subject table (three samples a person) so the by_subject test isolates the partition."""
    return np.array([f"p{int(i) // 3}" for i in ids], dtype=object)


def _partition(ids: np.ndarray, strategy: str, seed: int = 0):
    ids = np.sort(ids)
    return partition(ids, np.zeros(len(ids), np.int64), shards=3, slices=4, strategy=strategy, seed=seed,
                     subjects=_person(ids) if strategy == "by_subject" else None)


@pytest.mark.parametrize("x", EXTRA)
@pytest.mark.parametrize("strategy", ["uniform", "by_subject"])
def test_adding_one_record_moves_no_other_record_between_shards_or_slices(strategy, x):
    before, after = _cells(_partition(D, strategy)), _cells(_partition(np.append(D, x), strategy))
    assert set(after) == set(D.tolist()) | {x}
    moved = [i for i in D.tolist() if before[i] != after[i]]
    assert moved == [], f"{len(moved)} of {len(D)} records changed shard or slice when id {x} was added"


@pytest.mark.parametrize("strategy", ["uniform", "by_subject"])
def test_removing_one_record_keeps_the_order_of_every_other_record_within_its_slice(strategy):
    full, without = _slice_orders(_partition(D, strategy)), _slice_orders(_partition(D[D != 300], strategy))
    assert {cell: [i for i in order if i != 300] for cell, order in full.items()} == without


@pytest.mark.parametrize("x", EXTRA)
def test_adding_one_record_gives_no_other_record_another_synthetic_subject(x):
    before = dict(zip(D.tolist(), synthetic_subjects(D, seed=0).tolist()))
    grown = np.append(D, x)
    after = dict(zip(grown.tolist(), synthetic_subjects(grown, seed=0).tolist()))
    changed = [i for i in D.tolist() if before[i] != after[i]]
    assert changed == [], f"{len(changed)} of {len(D)} records changed subject when id {x} was added"


def test_a_synthetic_subject_depends_only_on_the_seed_and_the_id():
    whole = dict(zip(range(0, 2000), synthetic_subjects(np.arange(2000, dtype=np.int64), seed=0).tolist()))
    part = np.arange(700, 1300, 7, dtype=np.int64)
    assert synthetic_subjects(part, seed=0).tolist() == [whole[i] for i in part.tolist()]


@pytest.mark.parametrize("strategy", ["uniform", "by_subject"])
def test_the_same_seed_gives_the_same_assignment_and_another_seed_another(strategy):
    a, b, c = _partition(D, strategy, seed=7), _partition(D, strategy, seed=7), _partition(D, strategy, seed=8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    ca, cc = _cells(a), _cells(c)
    assert sum(ca[i] != cc[i] for i in D.tolist()) > len(D) // 2  # about 11/12 of the records land elsewhere
