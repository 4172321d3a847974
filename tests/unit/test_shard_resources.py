"""Per-shard Ray resources (issue 8): a layout that fits is never refused by rounding; one that does not fails fast."""
import pytest

from pipeline.config import RayConfig, from_dict
from pipeline.sisa.cluster import ClusterError
from pipeline.sisa.driver import RESOURCE_UNITS, Resources, resource_share, shard_resources


def _config(shards: int, device: str = "auto", **ray):
    return from_dict({"shards": {"count": shards}, "train": {"device": device},
                      "ray": {**RayConfig().__dict__, **ray}})


def _is_unit_multiple(amount: float) -> bool:
    return abs(amount * RESOURCE_UNITS - round(amount * RESOURCE_UNITS)) < 1e-6


def test_granularity_is_rays():
    import ray._raylet

    assert RESOURCE_UNITS == ray._raylet.RESOURCE_UNIT_SCALING


@pytest.mark.parametrize("shards", [3, 6, 7, 9, 11, 13, 2, 4, 5])
def test_an_equal_share_of_2_cpus_always_fits(shards):
    res = shard_resources(_config(shards), {"CPU": 2.0})
    assert 0 < res.cpus <= 2.0 / shards and _is_unit_multiple(res.cpus)
    assert round(res.cpus * RESOURCE_UNITS) * shards <= 2 * RESOURCE_UNITS  # in Ray's own fixed-point units
    assert res.cpus > 2.0 / shards - 1 / RESOURCE_UNITS  # rounded down by less than one unit
    assert res.gpus == 0.0


def test_three_shards_on_two_cpus_get_0_6666():
    assert shard_resources(_config(3), {"CPU": 2.0}) == Resources(0.6666, 0.0)


def test_one_shard_keeps_the_1_cpu_cap():
    assert shard_resources(_config(1), {"CPU": 2.0}) == Resources(1.0, 0.0)
    assert shard_resources(_config(1), {"CPU": 0.5}) == Resources(0.5, 0.0)


@pytest.mark.parametrize("shards, gpus", [(3, 1.0), (6, 1.0), (7, 2.0), (3, 2.0), (2, 4.0)])
def test_gpus_are_shared_the_same_way(shards, gpus):
    res = shard_resources(_config(shards), {"CPU": 16.0, "GPU": gpus})
    assert 0 < res.gpus <= min(1.0, gpus / shards) and _is_unit_multiple(res.gpus)
    assert round(res.gpus * RESOURCE_UNITS) * shards <= gpus * RESOURCE_UNITS
    assert shard_resources(_config(3), {"CPU": 16.0, "GPU": 1.0}).gpus == 0.3333
    assert shard_resources(_config(3, device="cpu"), {"CPU": 16.0, "GPU": 1.0}).gpus == 0.0  # a CPU run asks no GPU


def test_resource_share_rounds_down_in_rays_units():
    assert resource_share(2.0, 3) == 0.6666 and resource_share(1.0, 3) == 0.3333
    assert resource_share(0.7, 1) == 0.7  # 0.7 * 1e4 is 6999.999… in floats: still 7000 units
    assert resource_share(0.99, 3) == 0.33 and resource_share(0.0, 4) == 0.0


def test_an_explicit_request_that_does_not_fit_is_refused():
    with pytest.raises(ClusterError, match=r"3 shards × \(CPU 1.0, GPU 0.0\) do not fit the cluster's CPU 2.0"):
        shard_resources(_config(3, cpus_per_shard=1.0), {"CPU": 2.0})
    with pytest.raises(ClusterError, match="do not fit"):
        shard_resources(_config(3, gpus_per_shard=0.5), {"CPU": 2.0, "GPU": 1.0})
    with pytest.raises(ClusterError, match="do not fit"):  # Ray rounds 0.66667 to 0.6667: 3 × 0.6667 > 2
        shard_resources(_config(3, cpus_per_shard=0.66667), {"CPU": 2.0})
    assert shard_resources(_config(3, cpus_per_shard=0.6666), {"CPU": 2.0}).cpus == 0.6666


def test_more_shards_than_rays_smallest_share_is_refused():
    with pytest.raises(ClusterError, match="cannot each get a share of the cluster's CPU 1.0"):
        shard_resources(_config(20_001), {"CPU": 1.0})
    with pytest.raises(ClusterError, match="do not fit"):  # no resources at all
        shard_resources(_config(2), {})
