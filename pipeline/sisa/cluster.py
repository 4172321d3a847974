"""Connecting to Ray: a running cluster (ray job submit, `ray start --head`) or a local one."""
from __future__ import annotations

import os
import warnings

import ray

from pipeline.config import RayConfig
from pipeline.errors import UserError
from pipeline.storage.paths import in_ray_job  # noqa: F401  (cluster.in_ray_job kept for callers)


class ClusterError(UserError, RuntimeError):
    """The Ray cluster cannot run this configuration; the message says what to change."""


def connect(config: RayConfig, log=print) -> bool:
    """Join the cluster named by ray.address / RAY_ADDRESS, else start a local one.
    Returns True when this process started a local cluster (it dies with the process)."""
    if ray.is_initialized():
        return False
    warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
    address = config.address or os.environ.get("RAY_ADDRESS")
    common = {"namespace": config.namespace, "log_to_driver": True, "configure_logging": False}
    if address:
        ray.init(address=address, **common)
        log(f"connected to Ray cluster at {address}")
        return False
    ray.init(num_cpus=config.num_cpus, include_dashboard=False, **common)
    log(f"started a local Ray cluster ({ray.cluster_resources().get('CPU', 0):g} CPUs, "
        f"{ray.cluster_resources().get('GPU', 0):g} GPUs)")
    return True


def named_actor(name: str, namespace: str):
    """A live detached actor by name, or None."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None
