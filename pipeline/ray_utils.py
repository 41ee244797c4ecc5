"""Connecting to Ray the same way locally and under `ray job submit`, and sizing work to it.

On 2 cores the defaults deadlock (../shared/ENVIRONMENT.md): an actor pool that takes every
CPU starves the read tasks feeding it, so every stage asks for a fraction of the cluster's CPUs.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None, quiet: bool = True) -> dict:
    """Use the cluster we were submitted to (RAY_ADDRESS), else start a private local one.

    Returns `ray.cluster_resources()`.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            log.info("connecting to the Ray cluster at %s", address)
            ray.init(address=address, log_to_driver=not quiet or True)
        else:
            cpus = num_cpus or os.cpu_count() or 1
            log.info("starting a local Ray instance with %d CPUs", cpus)
            ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                     log_to_driver=True, configure_logging=True,
                     logging_level=logging.WARNING if quiet else logging.INFO)
    if quiet:
        from ray.data import DataContext

        DataContext.get_current().enable_operator_progress_bars = False
    return ray.cluster_resources()


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def alive_node_count() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))
