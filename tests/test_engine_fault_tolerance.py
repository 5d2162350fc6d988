"""An engine process killed mid-rollout: the rollout completes with every sample exactly once, the engine is
restarted, re-registered with the router and given the current weights, and the run continues.
Real Ray actors, real sglang-router, real engines; the kill is a real `ray.kill` of the engine's process."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import ray

from glm_rl.config import parse_args
from glm_rl.rollout.engine_client import EngineClient
from glm_rl.runtime import Runtime
from glm_rl.train import run_step


@pytest.fixture
def runtime(tmp_path):
    cfg = parse_args(["--output-dir", str(tmp_path), "--rollout-batch-size", "16", "--n-samples-per-prompt", "8",
                      "--num-rollout", "3", "--no-report"])
    rt = Runtime.start(cfg)
    yield cfg, rt
    rt.shutdown()
    ray.shutdown()


def test_engine_killed_mid_rollout(runtime):
    cfg, rt = runtime
    first = run_step(cfg, rt, 0)
    assert first["sync/verified"] == 1.0 and first["engines/restarted"] == 0.0
    old_url = rt.engine_urls[0]

    pending = rt.rollout_manager.generate.remote(1)
    time.sleep(0.05)
    ready, _ = ray.wait([pending], timeout=0)
    assert not ready, "the rollout finished before the kill: make it longer"
    ray.kill(rt.engines[0])
    samples, metrics = ray.get(pending)
    assert sorted(s.index for s in samples) == list(range(cfg.samples_per_rollout))  # none lost or duplicated
    assert all(len(s.response_ids) == len(s.rollout_logprobs) > 0 for s in samples)

    health = rt.ensure_engines()
    assert health["engines/restarted"] == 1.0
    assert rt.engine_urls[0] != old_url
    assert EngineClient(rt.engine_urls[0]).health()
    assert any(w["url"] == rt.engine_urls[0] for w in rt.router.workers())
    assert all(w["url"] != old_url for w in rt.router.workers())
    # the restarted engine holds the trainer's current weights (version and bitwise checksums)
    info = EngineClient(rt.engine_urls[0], api_key=rt.api_key).model_info()  # the run's secret: not /health
    assert info["weight_version"] == rt.weight_version == 1

    after = run_step(cfg, rt, 2)
    assert after["sync/verified"] == 1.0 and after["engines/restarted"] == 0.0
    assert after["rollout/num_samples"] == after["train/num_samples"] == cfg.samples_per_rollout
    assert after["routing/replay_agreement"] == 1.0


def test_engine_launchers_follow_the_replay_decision():
    """Both engine kinds are `RolloutEngine`s to the runtime; the launcher derives every engine-side routing
    setting from `engines_return_routed_experts`, and says whether routed experts survive the router."""
    from glm_rl.engine import EmbeddedEngine
    from glm_rl.ray.engines import RolloutEngine, engine_launcher
    from glm_rl.rollout.sglang_engine import SGLangEngine

    assert issubclass(EmbeddedEngine, RolloutEngine) and issubclass(SGLangEngine, RolloutEngine)
    for routed in (True, False):
        cfg = parse_args([] if routed else ["--no-use-rollout-routing-replay"])
        kw = dict(routed_experts=routed, seed=cfg.seed, colocate=False, use_gpu=False, api_key="k")
        embedded = engine_launcher(cfg.rollout, cfg.model, **kw)
        assert embedded.config.record_routed_experts is embedded.config.return_routed_experts_by_default is routed
        assert embedded.returns_routing_by_default is routed  # R3 requests may go through the router
        sglang = engine_launcher(replace(cfg.rollout, rollout_engine="sglang"), cfg.model, **kw)
        assert sglang.config.enable_return_routed_experts is routed
        assert sglang.returns_routing_by_default is False  # the router drops the flag: R3 goes to engines directly
