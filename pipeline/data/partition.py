"""Pure partitioning: private sample ids → (shard, slice), from a keyed hash of each id.

`uniform` places a sample by a keyed hash of its id: shard = h₀ mod S, slice = h₁ mod R, and its
place within the slice by h₂ (h₀, h₁, h₂: independent 64-bit words of one BLAKE2b digest keyed by
the partition key). `by_subject` (pipeline/data/subjects.py) does the same with the hash of the
subject id, so a person's samples share one shard and one slice. A record's cell therefore depends
only on (key, its own id): adding or removing one record moves no other record, so neighbouring
data sets differ in one record of one shard, and per-shard DP composes in parallel to (ε, δ) for
the ensemble. The key is derived from the run's seed (`partition_key`; `key_record` is what a run
records so the partition can be recomputed), so two trainings with the same seed agree.

Shard and slice sizes are therefore not equal but binomial around n/S and n/(S·R); they are
treated as public: they set each shard's sampling rate and noise (recipes.json records them).
A hash can leave a slice empty by chance on tiny data; that is a `PartitionError` naming the fix.

`class_balanced` and `kmeans` choose shards from the labels and features of the private data:
they are data-dependent, allowed only without DP (pipeline/config.py refuses them with
`privacy.epsilon` set); their slices and in-slice order come from the same keyed hash.
Strategies are a registry so a new one is one function.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.data.keyed import (  # noqa: F401  (partition.X kept for callers)
    HASH_SCHEME,
    PartitionError,
    check_cells,
    columns,
    derive_key,
    id_items,
    key_record,
    keyed_words,
    partition_key,
    sample_words,
    subject_words,
)

# ---------------------------------------------------------------------------------------------
# Data-dependent shard choices (not with DP)
# ---------------------------------------------------------------------------------------------


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


STRATEGIES: dict[str, Callable[..., list[np.ndarray]] | None] = {
    "uniform": None,  # the keyed hash alone
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
    key: str | None = None,
) -> dict[str, np.ndarray]:
    """Columns `sample_id`, `shard`, `slice` (one row per id, sorted by shard, slice, hash order).

    `uniform`: each id's cell is a keyed hash of the id (see the module docstring); the key is
    `partition_key(seed, key)`. `by_subject` hashes each data subject's id instead (`subjects`
    aligned with `ids`), so erasing a person replays one shard from one slice. Sizes vary by
    chance and are public. Raises `PartitionError` when the ids cannot fill S × R slices, or
    when the hash leaves one empty."""
    hash_key = partition_key(seed, key)
    if strategy == "by_subject":
        from pipeline.data.subjects import partition_by_subject

        if subjects is None:
            raise PartitionError("partition.strategy=by_subject needs a subject per sample (data.subjects).")
        return partition_by_subject(np.asarray(ids, np.int64), np.asarray(subjects), shards, slices, seed, key=key)
    if strategy not in STRATEGIES:
        raise PartitionError(f"partition.strategy '{strategy}' unknown; choose one of {', '.join([*STRATEGIES, 'by_subject'])}.")
    if shards < 1 or slices < 1:
        raise PartitionError(f"shards.count={shards} and shards.slices={slices} must both be at least 1.")
    ids = np.asarray(ids, np.int64)
    if len(np.unique(ids)) != len(ids):
        raise PartitionError("sample ids must be unique.")
    words = sample_words(ids, hash_key)
    choose = STRATEGIES[strategy]
    if choose is None:
        if len(ids) < shards * slices:
            raise PartitionError(
                f"shards.slices={slices} × shards.count={shards} = {shards * slices} slices is more than the {len(ids)} samples "
                f"(partition.strategy={strategy}); lower shards.slices or shards.count."
            )
        shard = (words[:, 0] % np.uint64(shards)).astype(np.int64)
    else:
        groups = choose(ids, np.asarray(labels), features, shards, np.random.default_rng([seed, 7919]))
        smallest = min(len(g) for g in groups)
        if smallest < slices:
            raise PartitionError(
                f"shards.slices={slices} is more than the smallest shard's {smallest} samples "
                f"({len(ids)} samples over shards.count={shards}, partition.strategy={strategy}); "
                "lower shards.slices or shards.count."
            )
        position = {int(i): s for s, group in enumerate(groups) for i in group.tolist()}
        shard = np.array([position[int(i)] for i in ids.tolist()], np.int64)
    slice_ = (words[:, 1] % np.uint64(slices)).astype(np.int64)
    check_cells(shard, slice_, shards, slices, f"{len(ids)} samples", strategy)
    return columns(ids, shard, slice_, words[:, 2])
