"""Connecting to Ray and sizing the worker pool from ``cfg.cluster`` and ``cfg.stage``."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import ray
from omegaconf import DictConfig, OmegaConf

from pipeline.paths import PROJECT_ROOT

log = logging.getLogger(__name__)


def connect(cluster: DictConfig) -> bool:
    """Starts or joins Ray; returns True when this call started it (so we shut it down).

    ``cluster.address`` null starts an in-process cluster limited to ``num_cpus`` /
    ``num_gpus`` (null: the machine's); "auto" or "ray://host:port" joins one.
    """
    if ray.is_initialized():
        return False  # e.g. a notebook or test session already connected
    runtime_env = cluster.get("runtime_env")
    runtime_env = OmegaConf.to_container(runtime_env, resolve=True) if runtime_env else None
    if cluster.get("address"):
        ray.init(address=cluster.address, runtime_env=runtime_env, log_to_driver=True)
    else:
        hook = "pipeline.execution.cluster.quiet_local_workers"
        runtime_env = {"worker_process_setup_hook": hook, **(runtime_env or {})}
        ray.init(
            num_cpus=cluster.get("num_cpus"),
            num_gpus=cluster.get("num_gpus"),
            include_dashboard=False,
            runtime_env=runtime_env,
            # Workers import pipeline/ and sam_core/ from the checkout, installed or not.
            job_config=ray.job_config.JobConfig(code_search_path=[str(PROJECT_ROOT)]),
        )
    return True


def quiet_local_workers() -> None:
    """Worker setup hook of the in-process cluster.

    Ray Train's placement-group cleaner asks the state API, which needs the dashboard
    that the local cluster leaves off (a process and memory a laptop can spare better),
    whether the training controller is alive: it would warn once a second for the whole
    run. Locally it has nothing to clean up anyway: the cluster ends with the driver.
    """
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


@dataclass(frozen=True)
class PoolSize:
    """How many annotator actors to start and what each one reserves."""

    actors: int
    num_cpus: float
    num_gpus: float

    def options(self) -> dict[str, Any]:
        # Ray restarts nothing by itself: the scheduler replaces dead actors and decides
        # which unit to retry, so retries stay bounded and attributable. SPREAD puts the
        # actors on as many nodes as possible, so losing one node loses few of them and
        # every node's disk and network share the reading and writing.
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "max_restarts": 0,
                "scheduling_strategy": "SPREAD"}


def pool_size(stage: DictConfig, units: int) -> PoolSize:
    """One actor per GPU when the cluster has GPUs, else ``num_actors`` CPU actors.

    ``stage.num_actors`` null means: GPUs if any, else cluster CPUs // cpus_per_actor.
    Never more actors than units: an idle actor would only hold a model in memory; CPU
    actors then share out the CPUs the missing actors would have used, but never more
    than one node holds: an actor asking for the cluster's total would fit on no node of
    a cluster of small nodes, and wait forever.
    """
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    per_actor = stage.cpus_per_actor
    if stage.num_actors:
        actors = stage.num_actors
    elif gpus:
        actors = gpus
    else:
        actors = max(1, cpus // per_actor)
    actors = max(1, min(actors, units))
    if gpus:
        return PoolSize(actors=actors, num_cpus=per_actor, num_gpus=1)
    share = min(cpus // actors, smallest_node_cpus() or cpus)
    return PoolSize(actors=actors, num_cpus=max(per_actor, share), num_gpus=0)


def smallest_node_cpus() -> int:
    """CPUs of the smallest alive node that has any (0 when none reports CPUs): a share
    up to this size fits on every node, so SPREAD can use them all."""
    sizes = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return min((c for c in sizes if c > 0), default=0)
