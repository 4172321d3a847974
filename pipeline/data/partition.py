"""Pure partitioning: private sample ids → (shard, slice).

Shards are disjoint; each shard is cut into R near-equal slices in a seeded order. Strategies
are a registry so a new one is one function.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.errors import UserError


class PartitionError(UserError, ValueError):
    """The data cannot be split as asked (e.g. more slices than samples in a shard)."""


def _uniform(ids: np.ndarray, labels: np.ndarray, features: np.ndarray | None, shards: int, rng) -> list[np.ndarray]:
    return np.array_split(rng.permutation(ids), shards)


def _class_balanced(ids, labels, features, shards, rng) -> list[np.ndarray]:
    """Deal each class round-robin over the shards so every shard sees the same class mix."""
    buckets: list[list[np.ndarray]] = [[] for _ in range(shards)]
    offset = 0
    for label in np.unique(labels):
        members = rng.permutation(ids[labels == label])
        for shard in range(shards):
            buckets[shard].append(members[(np.arange(len(members)) + offset) % shards == shard])
        offset += len(members)
    return [np.concatenate(b) for b in buckets]


def _kmeans(ids, labels, features, shards, rng) -> list[np.ndarray]:
    """Seed 002's clustering mode: k-means on (PCA-reduced) inputs, one cluster per shard."""
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.decomposition import PCA

    flat = features.reshape(len(features), -1)
    seed = int(rng.integers(2**31 - 1))
    reduced = PCA(n_components=min(20, flat.shape[1], len(flat)), random_state=seed).fit_transform(flat)
    assignment = MiniBatchKMeans(n_clusters=shards, random_state=seed, n_init=3).fit_predict(reduced)
    return [ids[assignment == shard] for shard in range(shards)]


STRATEGIES: dict[str, Callable[..., list[np.ndarray]]] = {
    "uniform": _uniform,
    "class_balanced": _class_balanced,
    "kmeans": _kmeans,
}


def partition(
    ids: np.ndarray,
    labels: np.ndarray,
    shards: int,
    slices: int,
    strategy: str = "uniform",
    seed: int = 0,
    features: np.ndarray | None = None,
    subjects: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Columns `sample_id`, `shard`, `slice` (one row per id, sorted by shard, slice, order).
    `by_subject` keeps each data subject's samples in one shard and one slice (`subjects`
    aligned with `ids`), so erasing a person replays one shard from one slice."""
    if strategy == "by_subject":
        from pipeline.data.subjects import partition_by_subject

        if subjects is None:
            raise PartitionError("partition.strategy=by_subject needs a subject per sample (data.subjects).")
        return partition_by_subject(np.asarray(ids, np.int64), np.asarray(subjects), shards, slices, seed)
    if strategy not in STRATEGIES:
        raise PartitionError(f"partition.strategy '{strategy}' unknown; choose one of {', '.join([*STRATEGIES, 'by_subject'])}.")
    if len(np.unique(ids)) != len(ids):
        raise PartitionError("sample ids must be unique.")
    rng = np.random.default_rng([seed, 7919])
    groups = STRATEGIES[strategy](np.asarray(ids, np.int64), np.asarray(labels), features, shards, rng)
    smallest = min(len(g) for g in groups)
    if smallest < slices:
        raise PartitionError(
            f"shards.slices={slices} is more than the smallest shard's {smallest} samples "
            f"({len(ids)} samples over shards.count={shards}, partition.strategy={strategy}); "
            "lower shards.slices or shards.count."
        )
    sample_id, shard_col, slice_col = [], [], []
    for shard, group in enumerate(groups):
        order = rng.permutation(np.sort(group))  # sort first: the result must not depend on strategy order
        for slice_index, part in enumerate(np.array_split(order, slices)):
            sample_id.append(part)
            shard_col.append(np.full(len(part), shard, np.int32))
            slice_col.append(np.full(len(part), slice_index, np.int32))
    return {
        "sample_id": np.concatenate(sample_id).astype(np.int64),
        "shard": np.concatenate(shard_col),
        "slice": np.concatenate(slice_col),
    }
