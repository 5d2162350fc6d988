"""Train-only runtime for `--load-debug-rollout-data`: trainers replay saved rollouts; no engines, router or
rollout manager.

It stands in for `Runtime` in the training loop (same stage methods): `rollout(step)` reads step's dump
(`rollout/debug_data.py`), `sync_weights` and `ensure_engines` have nothing to do, checkpoints save the
trainers (and the step) as usual. The trainer group is built exactly as in a full run (placement bundles in
rank order, the same sections and seed), so the same samples train to the same metrics (fp32, CPU).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import ray

from glm_rl.colocation import Colocation
from glm_rl.config import RunConfig
from glm_rl.ray.placement import Placement, create_placement, init_ray
from glm_rl.rollout.debug_data import load_rollout
from glm_rl.rollout.samples import Sample
from glm_rl.trainer.group import TrainerGroup, TrainerSections

log = logging.getLogger(__name__)


@dataclass
class ReplayRuntime:
    cfg: RunConfig
    placement: Placement
    trainers: TrainerGroup
    weight_version: int = 0

    @classmethod
    def start(cls, cfg: RunConfig) -> ReplayRuntime:
        import torch

        n = cfg.train.num_trainer_ranks
        init_ray(cfg.ray_address, num_cpus=n + 1)
        placement = create_placement(n, 0, False, use_gpu=torch.cuda.is_available(), strategy=cfg.placement_strategy)
        with contextlib.ExitStack() as undo:
            undo.callback(ray.util.remove_placement_group, placement.pg)
            trainers = TrainerGroup(
                TrainerSections.of(cfg), placement, 1.0, on_start=lambda actors: undo.callback(_kill_all, actors)
            )
            undo.pop_all()
        return cls(cfg, placement, trainers)

    @property
    def colocation(self) -> Colocation:
        return Colocation.off(self.trainers)  # no engines: nothing takes turns

    def ensure_engines(self) -> dict:
        return {}

    def rollout(self, step: int) -> tuple[list[Sample], dict]:
        path = self.cfg.debug.path(self.cfg.debug.load_debug_rollout_data, step)
        samples, metrics = load_rollout(path, step)
        return samples, dict(metrics)

    def evaluate(self, step: int) -> dict:
        return {}

    def sync_weights(self, version: int) -> dict:
        self.weight_version = version  # nothing to send: no engines
        return {}

    def save(self, step: int, data_state: dict | None = None) -> None:  # noqa: ARG002 - no prompts to place
        path = self.cfg.save_dir / f"step_{step:06d}"
        self.trainers.save(path)
        (path / "state.json").write_text(json.dumps({"step": step, "weight_version": self.weight_version}))
        (self.cfg.save_dir / "latest").write_text(path.name)

    def resume(self) -> int:
        load = self.cfg.load or self.cfg.ref_load
        if not load or not (Path(load) / "latest").is_file():
            return 0
        path = Path(load) / (Path(load) / "latest").read_text().strip()
        self.trainers.load(path)
        state = json.loads((path / "state.json").read_text())
        self.weight_version = state["weight_version"]
        return int(state["step"])

    def shutdown(self) -> None:
        for stop in (
            self.trainers.shutdown,
            lambda: _kill_all(self.trainers.actors),
            lambda: ray.util.remove_placement_group(self.placement.pg),
        ):
            try:
                stop()
            except Exception as e:  # keep tearing down the rest
                log.warning("shutdown step failed: %s", e)


def _kill_all(actors: list) -> None:
    for actor in actors:
        with contextlib.suppress(Exception):
            ray.kill(actor)
