"""Connecting to Ray: a running cluster (ray job submit, `ray start --head`) or a local one."""
from __future__ import annotations

import logging
import os
import warnings

import ray

from pipeline.config import RayConfig
from pipeline.errors import UserError
from pipeline.storage.paths import in_ray_job  # noqa: F401  (cluster.in_ray_job kept for callers)

logger = logging.getLogger(__name__)


class ClusterError(UserError, RuntimeError):
    """The Ray cluster cannot run this configuration; the message says what to change."""


def connect(config: RayConfig) -> bool:
    """Join the cluster named by ray.address / RAY_ADDRESS (`auto`: the last `ray start` on this host),
    else start a local one of this command's own (never a cluster some other `ray start` left running).
    Returns True when this process started a local cluster (it dies with the process)."""
    if ray.is_initialized():
        return False
    warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
    address = config.address or os.environ.get("RAY_ADDRESS")
    common = {"namespace": config.namespace, "log_to_driver": True, "configure_logging": False}
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, **common)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(f"cannot connect to the Ray cluster at {address} ({exc.__class__.__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}); start one with `ray start --head` "
                               "or unset RAY_ADDRESS / ray.address to run on a local one.") from None
        logger.info(f"connected to Ray cluster at {address}")
        return False
    # "local": a cluster of this command's own. With None, Ray would join the cluster named in
    # /tmp/ray/ray_current_cluster (the last `ray start` on the host, a test's or another user's)
    # while this function reported a local one; sharing a cluster takes RAY_ADDRESS (e.g. auto).
    ray.init(address="local", num_cpus=config.num_cpus, include_dashboard=False, **common)
    logger.info(f"started a local Ray cluster ({ray.cluster_resources().get('CPU', 0):g} CPUs, "
        f"{ray.cluster_resources().get('GPU', 0):g} GPUs)")
    return True


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast (instead of Ray's minutes of retries) when a host:port address has nothing listening."""
    import socket

    if "://" in address or address == "auto" or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as exc:
        raise ClusterError(f"no Ray cluster at {address} ({exc.__class__.__name__}: {exc}); start one with "
                           "`ray start --head` or unset RAY_ADDRESS / ray.address to run on a local one.") from None


def named_actor(name: str, namespace: str):
    """A live detached actor by name, or None."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None
