"""Keyed hashes of ids: where a record goes depends only on (key, its own id), never on the rest of
the data set (see `partition.py` for why this keeps the ensemble's DP argument valid)."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

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
