"""The real sglang-router (0.3.2 binary) in front of two EmbeddedEngines, and the R3 path around it."""

from __future__ import annotations

import asyncio
import pickle
import sys

import aiohttp
import pytest

from glm_rl.engine import EmbeddedEngine, EngineConfig, routed_experts
from glm_rl.models.glm45.presets import TINY_CHECKPOINT
from glm_rl.rollout.engine_client import EngineClient, EngineError
from glm_rl.rollout.router import RolloutEndpoints, RouterConfig, RouterProcess, router_command

PROMPTS = [[1, 2, 4, 23, 13, 10, 17, 11, 5, 23], [1, 2, 4, 16, 18, 18, 10, 15, 19, 5, 23]]
GREEDY = {"temperature": 0.0, "max_new_tokens": 6}


def test_router_command_snapshot():
    config = RouterConfig(worker_urls=("http://127.0.0.1:8001", "http://127.0.0.1:8002"), api_key="k")
    assert router_command(config, port=30000, prometheus_port=29000, python="python") == [
        "python",
        "-m",
        "sglang_router.launch_router",
        "--worker-urls",
        "http://127.0.0.1:8001",
        "http://127.0.0.1:8002",
        "--host",
        "127.0.0.1",
        "--port",
        "30000",
        "--policy",
        "round_robin",
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        "29000",
        "--log-level",
        "warn",
        "--api-key",
        "k",
    ]
    with pytest.raises(ValueError, match="policy"):
        RouterConfig(policy="fastest")


@pytest.fixture(scope="module")
def stack():
    engines = [EmbeddedEngine(EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT))) for _ in range(2)]
    urls = [e.start() for e in engines]
    router = RouterProcess(RouterConfig(worker_urls=tuple(urls)))
    try:
        router.start()
        yield router, [EngineClient(u, timeout=60) for u in urls]
    finally:
        router.shutdown()
        for e in engines:
            e.shutdown()
    assert router.proc.poll() is not None  # the router's process group is gone


def _served(clients) -> list[int]:
    return [c.server_info()["stats"]["requests_total"] for c in clients]


async def _many(url: str, payloads: list[dict]) -> list[dict]:
    client = EngineClient(url, timeout=60)
    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*(client.apost("/generate", p, session=session) for p in payloads))


def test_requests_through_router_reach_both_engines(stack):
    router, engines = stack
    direct = [engines[0].generate(p, GREEDY)["output_ids"] for p in PROMPTS]
    before = _served(engines)
    payloads = [
        {"input_ids": PROMPTS[i % 2], "sampling_params": GREEDY, "return_logprob": True, "rid": f"q{i}"}
        for i in range(10)
    ]
    answers = asyncio.run(_many(router.url, payloads))
    assert [a["output_ids"] for a in answers] == [direct[i % 2] for i in range(10)]
    assert [a["meta_info"]["id"] for a in answers] == [f"q{i}" for i in range(10)]  # rid survives
    assert all(len(a["meta_info"]["output_token_logprobs"]) == len(a["output_ids"]) for a in answers)
    served = [b - a for a, b in zip(before, _served(engines))]
    assert sum(served) == 10 and min(served) >= 3, served


def test_router_drops_return_routed_experts(stack):
    router, engines = stack
    body = {"input_ids": PROMPTS[0], "sampling_params": GREEDY, "return_logprob": True, "return_routed_experts": True}
    via_router = EngineClient(router.url).post("/generate", body)
    assert "routed_experts" not in via_router["meta_info"]  # the router rebuilt the body without it
    assert "output_token_logprobs" in via_router["meta_info"]  # return_logprob survives
    direct = engines[0].post("/generate", body)
    assert len(routed_experts.decode(direct["meta_info"])) == len(PROMPTS[0]) + len(direct["output_ids"]) - 1


def test_r3_path_goes_to_engines_round_robin(stack):
    router, engines = stack
    endpoints = RolloutEndpoints(router.url)
    assert endpoints.url_for(False) == router.url
    picked = [endpoints.url_for(True) for _ in range(4)]
    assert sorted(set(picked)) == sorted(c.url for c in engines) and picked[0] == picked[2] != picked[1]
    before = _served(engines)

    async def run():
        async with aiohttp.ClientSession() as session:
            payload = {"input_ids": PROMPTS[1], "sampling_params": GREEDY, "return_routed_experts": True}
            return await asyncio.gather(*(endpoints.generate(payload, session=session) for _ in range(4)))

    for answer in asyncio.run(run()):
        experts = routed_experts.decode(answer["meta_info"])
        assert experts.shape == (len(PROMPTS[1]) + len(answer["output_ids"]) - 1, 3, 2)  # 3 MoE layers, top-2
    assert [b - a for a, b in zip(before, _served(engines))] == [2, 2]


def test_remove_and_add_worker(stack):
    router, engines = stack
    router.remove_worker(engines[1].url)
    assert [w["url"] for w in router.workers()] == [engines[0].url]
    assert RolloutEndpoints(router.url).url_for(True) == engines[0].url
    before = _served(engines)
    asyncio.run(_many(router.url, [{"input_ids": PROMPTS[0], "sampling_params": GREEDY}] * 4))
    assert [b - a for a, b in zip(before, _served(engines))] == [4, 0]
    worker_id = router.add_worker(engines[1].url)
    assert worker_id and sorted(w["url"] for w in router.workers()) == sorted(c.url for c in engines)


def test_router_process_reports_a_failed_start():
    bad = RouterProcess(RouterConfig(extra_args=("--no-such-flag",), startup_timeout_s=20))
    with pytest.raises(RuntimeError, match="exited"):
        bad.start()
    assert sys.executable in bad.command[0]


def test_router_with_api_key_and_manager_hooks():
    """Keyed engines behind a keyed router (it health-checks /health unkeyed, forwards the key on the rest);
    the shorthand constructor and the picklable, R3-aware generate_fn a rollout manager receives."""
    engine = EmbeddedEngine(EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT), api_key="k"))
    url = engine.start()
    router = RouterProcess([url], api_key="k")
    try:
        router.start()
        assert EngineClient(router.url, api_key="k").generate(PROMPTS[0], GREEDY)["output_ids"]
        with pytest.raises(EngineError) as info:
            EngineClient(router.url).generate(PROMPTS[0], GREEDY)
        assert info.value.status == 401
        generate = pickle.loads(pickle.dumps(router.generate_fn()))
        payload = {"input_ids": PROMPTS[0], "sampling_params": GREEDY, "return_routed_experts": True}
        assert asyncio.run(generate(payload))["meta_info"]["routed_experts"]
        assert "routed_experts" not in asyncio.run(generate({**payload, "return_routed_experts": False}))["meta_info"]
    finally:
        router.stop()
        engine.shutdown()
