import hashlib

import numpy as np
import pytest

from pipeline.data.partition import PartitionError, key_record, partition, partition_key


def _cells(columns) -> dict[int, tuple[int, int]]:
    return {int(i): (int(s), int(r)) for i, s, r in zip(columns["sample_id"], columns["shard"], columns["slice"])}


@pytest.mark.parametrize("strategy", ["uniform", "class_balanced", "kmeans"])
def test_every_id_lands_in_exactly_one_shard_and_slice(strategy):
    rng = np.random.default_rng(0)
    ids = np.arange(300, dtype=np.int64)
    labels = rng.integers(0, 3, 300)
    features = rng.normal(size=(300, 1, 4, 4)).astype(np.float32)
    cols = partition(ids, labels, shards=3, slices=4, strategy=strategy, seed=1, features=features)
    assert sorted(cols["sample_id"].tolist()) == ids.tolist()
    assert set(cols["shard"].tolist()) == {0, 1, 2} and set(cols["slice"].tolist()) == {0, 1, 2, 3}
    assert cols["sample_id"].dtype == np.int64


def test_uniform_sizes_vary_by_chance_around_n_over_the_slices_and_are_seeded():
    ids = np.arange(6000, dtype=np.int64)
    a = partition(ids, np.zeros(6000), 3, 4, "uniform", seed=3)
    b = partition(ids, np.zeros(6000), 3, 4, "uniform", seed=3)
    c = partition(ids, np.zeros(6000), 3, 4, "uniform", seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["sample_id"], c["sample_id"])
    sizes = np.bincount(a["shard"] * 4 + a["slice"], minlength=12)
    assert len(set(sizes.tolist())) > 1  # a hash, not a cut into equal parts
    assert np.all(np.abs(sizes - 500) < 100)  # Binomial(6000, 1/12): sd ≈ 21


def test_uniform_cell_is_the_keyed_blake2b_of_the_id_bytes():
    """Pins the scheme itself (what a recorded key recomputes on any platform and numpy version)."""
    checked = [0, 1, 17, 1796, 59999, -3, 2**40]
    ids = np.unique(np.r_[np.arange(200), checked]).astype(np.int64)
    got = _cells(partition(ids, np.zeros(len(ids)), 5, 4, "uniform", seed=11))
    key = partition_key(11)
    for i in checked:
        digest = hashlib.blake2b(i.to_bytes(8, "little", signed=True), key=key, person=b"dpsisa:sample", digest_size=24).digest()
        words = [int.from_bytes(digest[k:k + 8], "little") for k in (0, 8)]
        assert got[i] == (words[0] % 5, words[1] % 4)


def test_uniform_does_not_depend_on_the_order_of_the_ids():
    ids = np.arange(500, dtype=np.int64)
    shuffled = np.random.default_rng(0).permutation(ids)
    a, b = partition(ids, np.zeros(500), 3, 2, seed=1), partition(shuffled, np.zeros(500), 3, 2, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_partition_key_comes_from_the_seed_or_an_explicit_key_and_is_recorded():
    assert partition_key(5) == partition_key(5) != partition_key(6)
    assert partition_key(5, "team-key") == partition_key(6, "team-key") != partition_key(5)
    ids = np.arange(400, dtype=np.int64)
    by_seed, by_key = partition(ids, np.zeros(400), 3, 2, seed=5), partition(ids, np.zeros(400), 3, 2, seed=5, key="team-key")
    assert not np.array_equal(by_seed["shard"], by_key["shard"])
    assert key_record(5) == {"scheme": "blake2b-keyed-v1", "derived_from": "seed", "seed": 5, "key": partition_key(5).hex()}
    assert key_record(5, "team-key")["derived_from"] == "partition.key"
    with pytest.raises(PartitionError, match="partition.key must be a non-empty string"):
        partition_key(5, " ")


def test_a_slice_the_hash_leaves_empty_is_a_one_line_error_naming_the_fix():
    with pytest.raises(PartitionError, match=r"left shard \d slice \d empty by chance .*lower shards.slices or shards.count") as info:
        partition(np.arange(13), np.zeros(13), shards=3, slices=4, seed=0)
    assert "\n" not in str(info.value)


def test_class_balanced_gives_every_shard_the_same_class_mix():
    labels = np.repeat([0, 1, 2], [60, 30, 90])
    cols = partition(np.arange(180), labels, 3, 2, "class_balanced", seed=0)
    lab = labels[cols["sample_id"]]
    for shard in range(3):
        assert np.bincount(lab[cols["shard"] == shard]).tolist() == [20, 10, 30]


def test_more_slices_than_shard_samples_is_an_error_naming_the_key():
    with pytest.raises(PartitionError, match="shards.slices"):
        partition(np.arange(10), np.zeros(10), shards=5, slices=3)
