"""Runtime: the live parts of a run (Ray placement, engines, router, rollout manager, trainer group, weight
sync, checkpoints), built once from the config and passed to the loop. Start-up order matters: placement
first (so trainer ranks and engines land where the layout says), engines before the router (it health-checks
them), trainers before the sync group (rank 0 is the broadcast source).

Each component gets its own sections: the engines an `EngineLauncher` (ray/engines.py), the rollout manager
the `rollout` section, the trainer group `TrainerSections`, the weight sync the `sync` section. Routing replay
is read once: `engines_return_routed_experts` decides what engines and rollout requests carry.

Faults: engines that die at any moment of a step are restored by `EngineRecovery` (recovery.py) from every stage
that uses them (step start, rollout, eval, weight sync); a dead trainer rank raises `TrainerRankDied`.
Checkpoints are written and found by `checkpoint.py` (durable, checked). `shutdown` is bounded in time and
ignores SIGINT / SIGTERM while it runs, so a second signal never leaves half the run behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray

from glm_rl.checkpoint import CheckpointDir, CheckpointError, find_checkpoint
from glm_rl.colocation import Colocation
from glm_rl.config import RunConfig, engines_return_routed_experts
from glm_rl.ray.addresses import node_ip
from glm_rl.ray.engines import EngineLauncher, engine_launcher
from glm_rl.ray.placement import Placement, create_placement, init_ray
from glm_rl.reaper import start_reaper
from glm_rl.recovery import EngineRecovery
from glm_rl.rollout.abort import AbortEngines
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
    api_key: str  # the run's secret: engines, router and weight sync use it
    weight_version: int = 0
    share: float = 1.0  # of a placement bundle, per actor
    recovery: EngineRecovery = field(init=False)
    colocation: Colocation = field(init=False)  # who holds each shared GPU in a phase (colocation.py)
    _step_faults: tuple[int, int] = (0, 0)  # (restarted, redone) when the step began

    def __post_init__(self) -> None:
        self.recovery = EngineRecovery(self)
        self.colocation = Colocation.of(
            self.cfg, self.trainers, self.engine_urls, self.api_key, use_gpu=self.placement.use_gpu
        )

    @classmethod
    def start(cls, cfg: RunConfig) -> Runtime:
        """Start every part in order. Each part registers its own undo as it starts, so a start that fails
        stops what it had started (router process, engines, trainers, placement group) and leaves nothing.
        A reaper process (reaper.py) stops what is left if the driver itself is killed."""
        start_reaper()
        with contextlib.ExitStack() as undo:
            rt = cls._start(cfg, undo)
            undo.pop_all()
            return rt

    @classmethod
    def _start(cls, cfg: RunConfig, undo: contextlib.ExitStack) -> Runtime:
        n_t, n_e = cfg.train.num_trainer_ranks, cfg.rollout.num_engines
        init_ray(cfg.ray_address, num_cpus=n_t + n_e + 2)
        import torch

        api_key = cfg.rollout.engine_api_key or secrets.token_hex(32)  # per run (hex: never a leading "-")
        placement = create_placement(
            n_t, n_e, cfg.colocate, use_gpu=torch.cuda.is_available(), strategy=cfg.placement_strategy
        )
        undo.callback(ray.util.remove_placement_group, placement.pg)
        share = 0.5 if cfg.colocate else 1.0
        routed = engines_return_routed_experts(cfg.algo.routing_replay)
        launcher = engine_launcher(
            cfg.rollout,
            cfg.model,
            routed_experts=routed,
            seed=cfg.seed,
            colocate=cfg.colocate,
            use_gpu=placement.use_gpu,
            api_key=api_key,
        )
        engines = []
        undo.callback(_kill_all, engines)
        engines += [launcher.launch(placement, b, share) for b in placement.engine_bundles]
        trainers = TrainerGroup(
            TrainerSections.of(cfg), placement, share, on_start=lambda actors: undo.callback(_kill_all, actors)
        )
        urls = ray.get([e.start.remote() for e in engines])
        router = RouterProcess(RouterConfig(worker_urls=tuple(urls), api_key=api_key, host=node_ip()))
        undo.callback(router.stop)
        router.start()
        manager = _start_manager(cfg, router, launcher.returns_routing_by_default, routed, api_key)
        undo.callback(_kill_all, [manager])
        trainers.setup_sync(cfg.sync, urls, api_key)
        ray.get(manager.data_state.remote())  # its dataset, tokenizer and reward loaded: startup, not step 1's time
        _write_placement(Path(cfg.output_dir), trainers, urls, router.url)
        return cls(cfg, placement, engines, urls, router, manager, trainers, launcher, api_key, share=share)

    # -- stages ----------------------------------------------------------------------------------------------
    def rollout(self, step: int) -> tuple[list[Sample], dict]:
        """One rollout batch; if engines die so that it fails, they are restored and the batch generated again
        from the same data position (same prompts, same seeds). Reports the data position after it."""
        manager = self.rollout_manager
        position = ray.get(manager.data_state.remote())
        samples, metrics = self.recovery.retry(
            lambda: ray.get(manager.generate.remote(step)),
            f"the rollout of step {step + 1}",
            lambda: ray.get(manager.load_data_state.remote(position)),
        )
        data = ray.get(manager.data_state.remote())
        return samples, metrics | {f"data/{k}": float(v) for k, v in data.items() if k in ("epoch", "offset")}

    def evaluate(self, step: int) -> dict:
        """The eval sets on the engines at their current weights (`step`: steps trained so far)."""
        return self.recovery.retry(lambda: ray.get(self.rollout_manager.evaluate.remote(step)), f"eval at {step}")

    def sync_weights(self, version: int) -> dict:
        """Push the trainer's weights as `version` (verified); engines that die meanwhile are restored."""
        t0 = time.time()
        self.weight_version = version  # what the trainer holds from now on: a restarted engine gets it too
        result = self.recovery.push(version)
        return {
            "sync/verified": float(result["verified"]),
            "sync/bytes": float(result["bytes"]),
            "sync/tensors": float(result["tensors"]),
            "sync/sources": float(result.get("sources", 1)),  # ranks that sent: one per PP stage, all for p2p
            "perf/sync_verify_s": float(result.get("verify_seconds", 0.0)),
            "engines/dead": float(len(result.get("dead", []))),
            "perf/sync_push_s": time.time() - t0,
        } | self.step_faults()  # the last stage: the step's counts

    def ensure_engines(self) -> dict:
        """A step begins: restore every engine that does not answer /health (a new actor on the same bundle,
        given the current weights, then re-registered with the router)."""
        self._step_faults = (self.recovery.restarted, self.recovery.redone)
        return {"engines/restarted": float(self.recovery.ensure())}

    def step_faults(self) -> dict:
        """Since the step began: engines restarted, rollout / eval calls run again after a restore."""
        restarted, redone = self._step_faults
        return {
            "engines/restarted": float(self.recovery.restarted - restarted),
            "rollout/redone": float(self.recovery.redone - redone),
        }

    # -- checkpoints -----------------------------------------------------------------------------------------
    def save(self, step: int, data_state: dict | None = None) -> None:
        """Write step `step` durably (checkpoint.py); on failure `latest` still names the previous checkpoint,
        and the CheckpointError says so. `data_state`: the prompt position to resume from, when a rollout ran
        ahead of training (overlap.py); else the rollout manager's."""
        ckpt = CheckpointDir(self.cfg.save_dir)
        state = {
            "step": step,
            "weight_version": self.weight_version,
            "data": data_state or ray.get(self.rollout_manager.data_state.remote()),
        }
        try:
            path = ckpt.save(step, self.trainers.save, state)
        except CheckpointError as e:
            latest = ckpt.latest()
            raise CheckpointError(
                f"saving step {step} failed: {e}; "
                + (f"{latest} is still the latest checkpoint" if latest else "no checkpoint yet")
            ) from None
        log.info("saved %s", path)

    def resume(self) -> int:
        """Step to start from: 0, or the step of the checkpoint --load names (checked; then weights are pushed)."""
        load = self.cfg.load or self.cfg.ref_load
        if not load:
            return 0
        path, message = find_checkpoint(Path(load), self.cfg.train.num_trainer_ranks)
        log.warning(message)
        if path is None:
            return 0
        state = json.loads((path / "state.json").read_text())
        self.trainers.load(path)
        ray.get(self.rollout_manager.load_data_state.remote(state["data"]))
        self.sync_weights(state["weight_version"])
        return int(state["step"])

    def shutdown(self) -> None:
        """Stop everything the run started, each part even when another fails, each bounded in time: trainers,
        router, engines (their own shutdown first: an SGLang engine stops its process group), then the actors
        and the placement group. SIGINT / SIGTERM are ignored meanwhile (restored after)."""
        with _signals_ignored():
            for stop in (
                lambda: self.trainers.shutdown(timeout_s=10),
                self.router.stop,
                lambda: ray.get([e.shutdown.remote() for e in self.engines], timeout=15),
                lambda: _kill_all([*self.engines, *self.trainers.actors, self.rollout_manager]),
                lambda: ray.util.remove_placement_group(self.placement.pg),
            ):
                try:
                    stop()
                except Exception as e:  # keep tearing down the rest
                    log.warning("shutdown step failed: %s", e)


def _start_manager(cfg: RunConfig, router: RouterProcess, engines_return_routing: bool, routed: bool, api_key: str):
    """The rollout manager actor, sending /generate through the router (routed experts through it only from engines
    that return them unasked: the router drops the flag)."""
    endpoints = RolloutEndpoints(router.url, api_key=api_key, engines_return_routing=engines_return_routing)
    return (
        ray.remote(RolloutManager)
        .options(num_cpus=0)
        .remote(
            cfg.rollout,
            cfg.model.hf_checkpoint,
            endpoints.generate,
            seed=cfg.seed,
            return_routed_experts=routed,
            eval_cfg=cfg.eval,
            abort=AbortEngines(router.url, api_key),
            agentic=cfg.agentic,
            asynchrony=cfg.asynchrony,
        )
    )


@contextlib.contextmanager
def _signals_ignored():
    """SIGINT / SIGTERM ignored inside (main thread only: elsewhere signals cannot be set and are left)."""
    try:
        saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        saved = {}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


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
