"""cluster.yaml must be a valid Ray cluster launcher config (Ray's own JSON schema)."""
import itertools
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from pipeline.config import RayConfig, from_dict
from pipeline.sisa.driver import shard_resources

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


def _header(text: str) -> str:
    """The comment block at the top of cluster.yaml (its usage notes)."""
    return "\n".join(itertools.takewhile(lambda line: line.startswith("#"), text.splitlines()))


def _token_auth_problems(config: dict) -> list[str]:
    """What would leave the cluster without Ray token auth (every node must get the token and the mode)."""
    problems = []
    text = yaml.safe_dump(config).lower()
    if "ray_auth_mode=disabled" in text.replace(" ", "") or "ray_auth_mode: disabled" in text:
        problems.append("RAY_AUTH_MODE=disabled")
    if "~/.ray/auth_token" not in config.get("file_mounts", {}):
        problems.append("the token is not copied to the nodes")
    if not any("RAY_AUTH_MODE=token" in c for c in config["setup_commands"]):
        problems.append("no node sets RAY_AUTH_MODE=token")
    return problems


def test_runs_live_on_object_storage_with_an_mlflow_server_on_the_head_and_token_auth_on():
    text = CLUSTER_YAML.read_text()
    config = yaml.safe_load(text)
    assert "--run-dir s3://" in _header(text)  # the documented usage keeps runs in a bucket ...
    assert "EFS" not in text and "NFS" not in text  # ... so no shared file system is asked for
    for node_type in config["available_node_types"].values():  # S3 credentials from an instance profile, not keys
        assert ":instance-profile/" in node_type["node_config"].get("IamInstanceProfile", {}).get("Arn", "")
    assert "AWS_SECRET_ACCESS_KEY" not in text and "AWS_ACCESS_KEY_ID" not in text
    mlflow = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert len(mlflow) == 1 and "hostname -I" in mlflow[0] and "0.0.0.0" not in mlflow[0]  # private IP only
    assert "--artifacts-destination s3://" in mlflow[0] and mlflow[0].rstrip().endswith("& fi")  # backgrounded
    exports = [c for c in config["setup_commands"] if "MLFLOW_TRACKING_URI=" in c]
    assert len(exports) == 1 and "http://${RAY_HEAD_IP:-" in exports[0] and ":5000" in exports[0]
    assert _token_auth_problems(config) == []


def test_token_auth_check_catches_a_config_that_disables_it():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    config["worker_start_ray_commands"] = ["ray stop", "RAY_AUTH_MODE=disabled ray start --address=$RAY_HEAD_IP:6379"]
    assert _token_auth_problems(config) == ["RAY_AUTH_MODE=disabled"]
    del config["file_mounts"]["~/.ray/auth_token"]
    assert "the token is not copied to the nodes" in _token_auth_problems(config)


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
    from pipeline.sisa.cluster import ClusterError

    config = from_dict({"shards": {"count": 3}, "ray": {**RayConfig().__dict__, "cpus_per_shard": 1.0}})
    with pytest.raises(ClusterError, match="do not fit"):
        shard_resources(config, {"CPU": 2.0})
