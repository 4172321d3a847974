"""cluster.yaml must be a valid Ray cluster launcher config (Ray's own JSON schema)."""
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from pipeline.config import RayConfig, from_dict
from pipeline.driver import shard_resources

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


def test_cluster_yaml_validates_against_rays_schema():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(prepare_config(config))  # what `ray up` does: fill defaults, then validate
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] == 1 and config["available_node_types"]["head"]["resources"]["CPU"] == 0
    assert any("pip install" in c and "-e" in c for c in config["setup_commands"])


def test_schema_check_catches_a_broken_config():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    config["available_node_types"]["gpu_worker"]["min_workerz"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("shards, cluster, expected", [
    (5, {"CPU": 2.0}, (0.4, 0.0)),
    (2, {"CPU": 16.0}, (1.0, 0.0)),
    (8, {"CPU": 64.0, "GPU": 4.0}, (1.0, 0.5)),
    (2, {"CPU": 16.0, "GPU": 8.0}, (1.0, 1.0)),
])
def test_shard_resources_fit_every_shard_on_the_cluster(shards, cluster, expected):
    config = from_dict({"shards": {"count": shards}})
    res = shard_resources(config, cluster)
    assert (res.cpus, res.gpus) == expected
    assert res.cpus * shards <= cluster["CPU"] and res.gpus * shards <= cluster.get("GPU", 0)


def test_an_impossible_per_shard_request_is_refused():
    from pipeline.cluster import ClusterError

    config = from_dict({"shards": {"count": 3}, "ray": {**RayConfig().__dict__, "cpus_per_shard": 1.0}})
    with pytest.raises(ClusterError, match="do not fit"):
        shard_resources(config, {"CPU": 2.0})
