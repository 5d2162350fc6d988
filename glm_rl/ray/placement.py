"""Placement: one bundle per trainer rank and per engine, in a deterministic order.

Disaggregated: trainer bundles [0, n_trainers), engine bundles after them. Colocated: engines share the
trainer ranks' bundles (engine i on bundle i % n_trainers). On GPU a bundle is {"GPU": 1, "CPU": 1}; on CPU it
is {"CPU": 1} (Ray's CPU count is logical: a 2-core machine still hosts 4 single-threaded actors).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from glm_rl.ray.addresses import node_ip

log = logging.getLogger(__name__)


@dataclass
class Placement:
    pg: PlacementGroup
    trainer_bundles: list[int]
    engine_bundles: list[int]
    use_gpu: bool

    def strategy(self, bundle: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=bundle)

    def node_ip(self, bundle: int) -> str:
        """The address of the node `bundle` was placed on (a zero-CPU task run there reports it)."""
        task = ray.remote(num_cpus=0)(_node_ip).options(scheduling_strategy=self.strategy(bundle))
        return ray.get(task.remote())

    def actor_options(self, bundle: int, share: float) -> dict:
        """Ray options for an actor on `bundle`, taking `share` of its resources (colocated actors split it)."""
        res = {"num_cpus": share, "num_gpus": share if self.use_gpu else 0}
        return {**res, "scheduling_strategy": self.strategy(bundle)}


def init_ray(address: str | None, num_cpus: int) -> None:
    """Join the cluster at `address` (its resources are its own: no num_cpus / num_gpus), or start a private
    one-node Ray — `address="local"`, so a cluster someone else runs on this machine is never
    joined by accident."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def create_placement(
    n_trainers: int, n_engines: int, colocate: bool, use_gpu: bool, timeout_s: float = 120.0, strategy: str = "PACK"
) -> Placement:
    n_bundles = n_trainers if colocate else n_trainers + n_engines
    bundle = {"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1}
    pg = placement_group([dict(bundle) for _ in range(n_bundles)], strategy=strategy)
    t0 = time.time()
    while not _ready(pg, 5.0):
        waited = time.time() - t0
        log.warning("waiting for %d placement bundles %s (%.0fs)", n_bundles, bundle, waited)
        if waited > timeout_s:
            raise TimeoutError(
                f"placement group of {n_bundles} x {bundle} not ready after {timeout_s:.0f}s: "
                f"cluster resources {ray.cluster_resources()}"
            )
    trainers = list(range(n_trainers))
    engines = [i % n_trainers for i in range(n_engines)] if colocate else list(range(n_trainers, n_bundles))
    return Placement(pg, trainers, engines, use_gpu)


def _node_ip() -> str:
    return node_ip()


def _ready(pg: PlacementGroup, timeout: float) -> bool:
    ready, _ = ray.wait([pg.ready()], timeout=timeout)
    return bool(ready)
