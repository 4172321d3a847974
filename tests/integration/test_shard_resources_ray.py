"""Per-shard Ray resources on a real 2-CPU Ray cluster: the computed share schedules every shard at once."""
import pytest

from pipeline.config import RayConfig, from_dict
from pipeline.sisa.driver import Resources, shard_resources


def _config(shards: int, device: str = "auto", **ray):
    return from_dict({"shards": {"count": shards}, "train": {"device": device},
                      "ray": {**RayConfig().__dict__, **ray}})


@pytest.mark.slow
def test_three_shards_sized_from_a_2_cpu_cluster_are_all_scheduled(ray_2cpu):
    """3 actors at the computed share run at once on 2 CPUs: plain, then the way driver.Ensemble places them
    (one placement-group bundle per shard, one actor per bundle)."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray = ray_2cpu
    res = shard_resources(_config(3), ray.cluster_resources())
    assert res == Resources(0.6666, 0.0)

    @ray.remote
    class Ping:
        def ping(self, shard: int) -> int:
            return shard

    def all_answer(actors: list) -> None:
        try:
            assert ray.get([a.ping.remote(s) for s, a in enumerate(actors)], timeout=15) == [0, 1, 2]
        finally:
            for actor in actors:
                ray.kill(actor)

    all_answer([Ping.options(num_cpus=res.cpus).remote() for _ in range(3)])
    group = placement_group([{"CPU": res.cpus}] * 3, strategy="SPREAD")
    try:
        ray.get(group.ready(), timeout=15)
        all_answer([Ping.options(num_cpus=res.cpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=s)).remote() for s in range(3)])
    finally:
        remove_placement_group(group)
