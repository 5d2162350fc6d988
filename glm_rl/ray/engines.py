"""Rollout engines as Ray actors: the surface the runtime drives (`RolloutEngine`), and one launcher per engine
kind (`EngineLauncher`), chosen once from --rollout-engine by `engine_launcher`.

Both kinds serve the same HTTP API (the SGLang native subset), so after `start()` everything goes through the
router and `EngineClient`. What differs is how an actor is started (its config, its GPUs) and whether its
answers carry the routed experts although sglang-router drops the request's `return_routed_experts` (the
embedded engine can be started to return them by default; a stock SGLang server cannot, so R3 requests then go
to an engine directly: rollout/router.py). Those differences are the launcher's, so the runtime never asks
which kind it holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import ray

from glm_rl.config import ModelConfig, RolloutConfig
from glm_rl.engine import EngineConfig, engine_actor_class
from glm_rl.ray.placement import Placement
from glm_rl.rollout.sglang_engine import SGLangEngine, SGLangServerConfig


@runtime_checkable
class RolloutEngine(Protocol):
    """The methods the runtime calls (through `.remote()`) on an engine actor: `EmbeddedEngine` and
    `SGLangEngine` both implement it (tested)."""

    def start(self) -> str:
        """Load the model, serve it over HTTP; the base URL (blocks until the server answers /health)."""
        ...

    def get_url(self) -> str: ...

    def shutdown(self) -> None:
        """Stop serving and free the engine's resources (SGLang: its whole process group)."""
        ...


class EngineLauncher(Protocol):
    """Starts engine actors of one kind with one config (the same config again when an engine is restarted)."""

    @property
    def returns_routing_by_default(self) -> bool:
        """Whether every /generate answer carries the routed experts, even through the router (which drops the
        request's flag)."""
        ...

    def launch(self, placement: Placement, bundle: int, share: float) -> ray.actor.ActorHandle:
        """A `RolloutEngine` actor on placement `bundle`, taking `share` of it (colocated actors split one)."""
        ...


@dataclass(frozen=True)
class EmbeddedLauncher:
    config: EngineConfig

    @property
    def returns_routing_by_default(self) -> bool:
        return self.config.return_routed_experts_by_default

    def launch(self, placement: Placement, bundle: int, share: float) -> ray.actor.ActorHandle:
        config = dataclasses.replace(self.config, host=placement.node_ip(bundle))  # reachable from any node
        return engine_actor_class().options(**placement.actor_options(bundle, share)).remote(config)


@dataclass(frozen=True)
class SGLangLauncher:
    config: SGLangServerConfig

    @property
    def returns_routing_by_default(self) -> bool:
        return False  # SGLang returns routed experts only when the request asks

    def launch(self, placement: Placement, bundle: int, share: float) -> ray.actor.ActorHandle:
        options = placement.actor_options(bundle, share) | {"num_gpus": share * self.config.tp_size}
        config = dataclasses.replace(self.config, host=placement.node_ip(bundle))  # reachable from any node
        return ray.remote(SGLangEngine).options(**options).remote(config)


def engine_launcher(
    rollout: RolloutConfig,
    model: ModelConfig,
    *,
    routed_experts: bool,
    seed: int,
    colocate: bool,
    use_gpu: bool,
    api_key: str,
) -> EngineLauncher:
    """The launcher --rollout-engine names. `routed_experts`: engines must return the experts each token was
    routed to (`engines_return_routed_experts`). An embedded engine runs on the GPU of its placement bundle when
    there is one (Ray sets the actor's CUDA_VISIBLE_DEVICES, so "cuda" is that GPU). `api_key`: the run's
    secret, which every engine endpoint but /health requires."""
    match rollout.rollout_engine:
        case "sglang":
            steps = rollout.speculative_num_steps
            return SGLangLauncher(
                SGLangServerConfig(
                    model_path=model.hf_checkpoint,
                    port=0,
                    api_key=api_key,
                    tp_size=rollout.rollout_num_gpus_per_engine,
                    random_seed=seed,
                    enable_return_routed_experts=routed_experts,
                    enable_memory_saver=colocate,
                    speculative_num_steps=steps if rollout.enable_mtp else 0,
                    speculative_num_draft_tokens=steps + 1,
                    extra_args=rollout.sglang_args
                    + (
                        (("max-running-requests", str(rollout.max_running_requests)),)
                        if rollout.max_running_requests
                        else ()
                    ),
                )
            )
        case "embedded":
            return EmbeddedLauncher(
                EngineConfig(
                    hf_checkpoint=model.hf_checkpoint,
                    dtype=model.dtype,
                    device="cuda" if use_gpu else "cpu",
                    api_key=api_key,
                    seed=seed,
                    max_batch_size=rollout.max_running_requests,
                    record_routed_experts=routed_experts,
                    return_routed_experts_by_default=routed_experts,
                    enable_mtp=rollout.enable_mtp,
                    speculative_num_steps=rollout.speculative_num_steps,
                )
            )
        case other:
            raise ValueError(f"--rollout-engine {other!r} unknown; valid: embedded, sglang")
