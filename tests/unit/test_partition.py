import numpy as np
import pytest

from pipeline.data.partition import PartitionError, partition


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


def test_uniform_slices_are_near_equal_and_seeded():
    ids = np.arange(103, dtype=np.int64)
    a = partition(ids, np.zeros(103), 2, 5, "uniform", seed=3)
    b = partition(ids, np.zeros(103), 2, 5, "uniform", seed=3)
    c = partition(ids, np.zeros(103), 2, 5, "uniform", seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["sample_id"], c["sample_id"])
    sizes = np.bincount(a["shard"] * 5 + a["slice"])
    assert sizes.max() - sizes.min() <= 1


def test_class_balanced_gives_every_shard_the_same_class_mix():
    labels = np.repeat([0, 1, 2], [60, 30, 90])
    cols = partition(np.arange(180), labels, 3, 2, "class_balanced", seed=0)
    lab = labels[cols["sample_id"]]
    for shard in range(3):
        assert np.bincount(lab[cols["shard"] == shard]).tolist() == [20, 10, 30]


def test_more_slices_than_shard_samples_is_an_error_naming_the_key():
    with pytest.raises(PartitionError, match="shards.slices"):
        partition(np.arange(10), np.zeros(10), shards=5, slices=3)
