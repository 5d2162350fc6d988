"""Runtime: the live parts of a run (Ray placement, engines, router, rollout manager, trainer group, weight
sync, checkpoints), built once from the config and passed to the loop. Start-up order matters: placement
first (so trainer ranks and engines land where the layout says), engines before the router (it health-checks
them), trainers before the sync group (rank 0 is the broadcast source).

Each component gets its own sections: the engines an `EngineLauncher` (ray/engines.py), the rollout manager
the `rollout` section, the trainer group `TrainerSections`, the weight sync the `sync` section. Routing replay
is read once: `engines_return_routed_experts` decides what engines and rollout requests carry.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from glm_rl.config import RunConfig, engines_return_routed_experts
from glm_rl.ray.addresses import node_ip
from glm_rl.ray.engines import EngineLauncher, engine_launcher
from glm_rl.ray.placement import Placement, create_placement, init_ray
from glm_rl.rollout.abort import AbortEngines
from glm_rl.rollout.engine_client import EngineClient
from glm_rl.rollout.manager import RolloutManager
from glm_rl.rollout.router import RolloutEndpoints, RouterConfig, RouterProcess
from glm_rl.rollout.samples import Sample
from glm_rl.trainer.group import TrainerGroup, TrainerSections

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    cfg: RunConfig
    placement: Placement
    engines: list
    engine_urls: list[str]
    router: RouterProcess
    rollout_manager: object
    trainers: TrainerGroup
    launcher: EngineLauncher  # to restart an engine as it was started
    api_key: str              # the run's secret: engines, router and weight sync use it
    weight_version: int = 0
    share: float = 1.0        # of a placement bundle, per actor

    @classmethod
    def start(cls, cfg: RunConfig) -> Runtime:
        """Start every part in order. Each part registers its own undo as it starts, so a start that fails
        stops what it had started (router process, engines, trainers, placement group) and leaves nothing."""
        with contextlib.ExitStack() as undo:
            rt = cls._start(cfg, undo)
            undo.pop_all()
            return rt

    @classmethod
    def _start(cls, cfg: RunConfig, undo: contextlib.ExitStack) -> Runtime:
        n_t, n_e = cfg.train.num_trainer_ranks, cfg.rollout.num_engines
        init_ray(cfg.ray_address, num_cpus=n_t + n_e + 2)
        import torch

        api_key = cfg.rollout.engine_api_key or secrets.token_urlsafe(32)  # per run: engines refuse strangers
        placement = create_placement(n_t, n_e, cfg.colocate, use_gpu=torch.cuda.is_available(),
                                     strategy=cfg.placement_strategy)
        undo.callback(ray.util.remove_placement_group, placement.pg)
        share = 0.5 if cfg.colocate else 1.0
        routed = engines_return_routed_experts(cfg.algo.routing_replay)
        launcher = engine_launcher(cfg.rollout, cfg.model, routed_experts=routed, seed=cfg.seed,
                                   colocate=cfg.colocate, use_gpu=placement.use_gpu, api_key=api_key)
        engines = []
        undo.callback(_kill_all, engines)
        engines += [launcher.launch(placement, b, share) for b in placement.engine_bundles]
        trainers = TrainerGroup(TrainerSections(cfg.model, cfg.train, cfg.algo, cfg.megatron, cfg.lora,
                                                temperature=cfg.rollout.rollout_temperature, seed=cfg.seed),
                                placement, share, on_start=lambda actors: undo.callback(_kill_all, actors))
        urls = ray.get([e.start.remote() for e in engines])
        router = RouterProcess(RouterConfig(worker_urls=tuple(urls), api_key=api_key, host=node_ip()))
        undo.callback(router.stop)
        router.start()
        # routed experts through the router only from engines that return them unasked (it drops the flag)
        endpoints = RolloutEndpoints(router.url, api_key=api_key,
                                     engines_return_routing=launcher.returns_routing_by_default)
        manager = ray.remote(RolloutManager).options(num_cpus=0).remote(
            cfg.rollout, cfg.model.hf_checkpoint, endpoints.generate, seed=cfg.seed, return_routed_experts=routed,
            eval_cfg=cfg.eval, abort=AbortEngines(router.url, api_key))
        undo.callback(_kill_all, [manager])
        trainers.setup_sync(cfg.sync, urls, api_key)
        _write_placement(Path(cfg.output_dir), trainers, urls, router.url)
        return cls(cfg, placement, engines, urls, router, manager, trainers, launcher, api_key, share=share)

    # -- stages ----------------------------------------------------------------------------------------------
    def rollout(self, step: int) -> tuple[list[Sample], dict]:
        return ray.get(self.rollout_manager.generate.remote(step))

    def evaluate(self, step: int) -> dict:
        """The eval sets on the engines at their current weights (`step`: steps trained so far)."""
        return ray.get(self.rollout_manager.evaluate.remote(step))

    def sync_weights(self, version: int) -> dict:
        t0 = time.time()
        result = self.trainers.push_weights(version)
        self.weight_version = version
        return {"sync/verified": float(result["verified"]), "sync/bytes": float(result["bytes"]),
                "sync/tensors": float(result["tensors"]), "perf/sync_push_s": time.time() - t0}

    def ensure_engines(self) -> dict:
        """Restart every engine that fails its health check: a new actor on the same bundle, re-registered
        with the router, the weight-sync group rebuilt, and the current weights pushed to it."""
        dead = [i for i, url in enumerate(self.engine_urls) if not EngineClient(url, timeout=5).health()]
        if not dead:
            return {"engines/restarted": 0.0}
        for i in dead:
            log.warning("engine %d at %s failed its health check: restarting it", i, self.engine_urls[i])
            try:
                ray.kill(self.engines[i])
            except Exception:  # already gone
                pass
            self.router.remove_worker(self.engine_urls[i])
            bundle = self.placement.engine_bundles[i]
            self.engines[i] = self.launcher.launch(self.placement, bundle, self.share)
            self.engine_urls[i] = ray.get(self.engines[i].start.remote())
            self.router.add_worker(self.engine_urls[i])
        self.trainers.setup_sync(self.cfg.sync, self.engine_urls, self.api_key)
        self.sync_weights(self.weight_version)  # the restarted engine gets the current weights (verified)
        return {"engines/restarted": float(len(dead))}

    # -- checkpoints -----------------------------------------------------------------------------------------
    def save(self, step: int) -> None:
        path = self.cfg.save_dir / f"step_{step:06d}"
        self.trainers.save(path)
        state = {"step": step, "weight_version": self.weight_version,
                 "data": ray.get(self.rollout_manager.data_state.remote())}
        (path / "state.json").write_text(json.dumps(state))
        (self.cfg.save_dir / "latest").write_text(path.name)
        log.info("saved %s", path)

    def resume(self) -> int:
        """Step to start from: 0, or the step of the latest checkpoint under --load (then weights are pushed)."""
        load = self.cfg.load or self.cfg.ref_load
        if not load or not (Path(load) / "latest").is_file():
            return 0
        path = Path(load) / (Path(load) / "latest").read_text().strip()
        state = json.loads((path / "state.json").read_text())
        self.trainers.load(path)
        ray.get(self.rollout_manager.load_data_state.remote(state["data"]))
        self.sync_weights(state["weight_version"])
        return int(state["step"])

    def shutdown(self) -> None:
        """Stop everything the run started, each part even when another fails: trainers, router, engines (their
        own shutdown first: an SGLang engine stops its process group), then the actors and the placement group."""
        for stop in (self.trainers.shutdown, self.router.stop,
                     lambda: ray.get([e.shutdown.remote() for e in self.engines], timeout=60),
                     lambda: _kill_all([*self.engines, *self.trainers.actors, self.rollout_manager]),
                     lambda: ray.util.remove_placement_group(self.placement.pg)):
            try:
                stop()
            except Exception as e:  # keep tearing down the rest
                log.warning("shutdown step failed: %s", e)


def _kill_all(actors: list) -> None:
    for actor in actors:
        with contextlib.suppress(Exception):  # already gone
            ray.kill(actor)


def _write_placement(out: Path, trainers: TrainerGroup, engine_urls: list[str], router_url: str) -> None:
    """Where each part runs (node address per trainer rank, engine and router URLs): placement.json."""
    ips = ray.get([a.node_ip.remote() for a in trainers.actors])
    where = {"driver": node_ip(), "router": router_url, "trainer_ranks": ips, "engines": engine_urls}
    out.mkdir(parents=True, exist_ok=True)
    (out / "placement.json").write_text(json.dumps(where, indent=1))
    log.info("placement: %s", where)
