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

import hashlib
from collections.abc import Callable, Iterable

import numpy as np

from pipeline.errors import UserError

HASH_SCHEME = "blake2b-keyed-v1"  # recorded with the key: how a cell follows from (key, id)
_SAMPLE_DOMAIN = b"dpsisa:sample"  # BLAKE2b personalisation (≤ 16 bytes): separates the uses of one key
_SUBJECT_DOMAIN = b"dpsisa:subject"


class PartitionError(UserError, ValueError):
    """The data cannot be split as asked (e.g. more slices than samples in a shard)."""


# ---------------------------------------------------------------------------------------------
# Keys and keyed hashes
# ---------------------------------------------------------------------------------------------


def derive_key(seed: int, purpose: str) -> bytes:
    """A 32-byte hash key for `purpose` (e.g. "partition"), a function of (seed, purpose) only."""
    return hashlib.blake2b(f"dpsisa/{purpose}/seed={int(seed)}".encode(), digest_size=32).digest()


def partition_key(seed: int, key: str | None = None) -> bytes:
    """The partition's hash key: from `key` (a user-chosen string, e.g. a future `partition.key`)
    when given, else derived from the run's seed. Same inputs, same key, on every platform."""
    if key is None:
        return derive_key(seed, "partition")
    if not isinstance(key, str) or not key.strip():
        raise PartitionError("partition.key must be a non-empty string; set one, or leave it unset to derive the key from seed.")
    return hashlib.blake2b(f"dpsisa/partition/key={key.strip()}".encode(), digest_size=32).digest()


def key_record(seed: int, key: str | None = None) -> dict:
    """What a run records about its partition key: the scheme, where the key came from and the
    key itself (hex), so its assignment can be recomputed from the ids alone."""
    return {"scheme": HASH_SCHEME, "derived_from": "seed" if key is None else "partition.key",
            "seed": int(seed), "key": partition_key(seed, key).hex()}


def keyed_words(key: bytes, items: Iterable[bytes], domain: bytes, words: int = 3) -> np.ndarray:
    """Keyed BLAKE2b of each item → `words` independent uint64 words per item (little-endian, so
    the same on every platform): array of shape (len(items), words)."""
    digests = b"".join(hashlib.blake2b(item, key=key, person=domain, digest_size=8 * words).digest() for item in items)
    return np.frombuffer(digests, dtype="<u8").reshape(-1, words).astype(np.uint64)


def id_items(ids: np.ndarray) -> list[bytes]:
    """Each id as its 8 little-endian int64 bytes (what the sample hash reads)."""
    raw = np.ascontiguousarray(np.asarray(ids, dtype="<i8")).tobytes()
    return [raw[i:i + 8] for i in range(0, len(raw), 8)]


def sample_words(ids: np.ndarray, key: bytes) -> np.ndarray:
    """(shard word, slice word, order word) of each sample id under `key`, shape (len(ids), 3)."""
    return keyed_words(key, id_items(ids), _SAMPLE_DOMAIN)


def subject_words(names: np.ndarray, key: bytes) -> np.ndarray:
    """(shard word, slice word, order word) of each subject id (its UTF-8 text) under `key`."""
    return keyed_words(key, (str(n).encode() for n in names), _SUBJECT_DOMAIN)


def columns(ids: np.ndarray, shard: np.ndarray, slice_: np.ndarray, order: np.ndarray) -> dict[str, np.ndarray]:
    """Rows sorted by shard, slice, then the hash order (ties, which a 64-bit hash all but never has, by id)."""
    ids = np.asarray(ids, np.int64)
    rows = np.lexsort((ids, order, slice_, shard))
    return {"sample_id": ids[rows], "shard": shard[rows].astype(np.int32), "slice": slice_[rows].astype(np.int32)}


def check_cells(shard: np.ndarray, slice_: np.ndarray, shards: int, slices: int, what: str, strategy: str) -> None:
    """Every (shard, slice) holds at least one sample; else one line naming the fix."""
    filled = np.bincount(np.asarray(shard, np.int64) * slices + slice_, minlength=shards * slices)
    empty = np.flatnonzero(filled == 0)
    if len(empty):
        s, r = divmod(int(empty[0]), slices)
        raise PartitionError(
            f"partition.strategy={strategy}: the keyed hash left shard {s} slice {r} empty by chance ({what} over "
            f"shards.count={shards} × shards.slices={slices}, {len(empty)} slice{'s' if len(empty) > 1 else ''} empty); "
            "lower shards.slices or shards.count, or change seed."
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
