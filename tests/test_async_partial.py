"""Partial rollouts through the real embedded engine (issue 19): a request cut by a weight update keeps its prefix
exactly — ids, the old weights' logprobs, the routing the old weights chose — and continues under the new weights
as a fresh request on prompt + prefix would."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from glm_rl.config import RolloutConfig
from glm_rl.engine import EmbeddedEngine, EngineConfig, routed_experts
from glm_rl.models.glm45.checkpoint import load_hf_model
from glm_rl.models.glm45.presets import TINY_CHECKPOINT
from glm_rl.rollout import partial
from glm_rl.rollout.engine_client import EngineClient
from glm_rl.rollout.generation import SampleGenerator

PROMPT = [1, 2, 4, 23, 13, 10, 17, 11, 5, 23]
LENGTH = 110


@pytest.fixture(scope="module")
def client():
    engine = EmbeddedEngine(EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT), max_batch_size=4))
    yield EngineClient(engine.start(), timeout=60)
    engine.shutdown()


def _payload(seed: int) -> dict:
    return {
        "input_ids": PROMPT,
        "sampling_params": {"max_new_tokens": LENGTH, "ignore_eos": True, "temperature": 1.0, "sampling_seed": seed},
        "return_logprob": True,
        "return_routed_experts": True,
        "rid": f"p{seed}",
    }


def _new_weights() -> list[tuple[str, torch.Tensor]]:
    model = load_hf_model(TINY_CHECKPOINT)[0]
    g = torch.Generator().manual_seed(0)
    return [
        (n, t + 0.05 * torch.randn(t.shape, generator=g))
        for n, t in model.state_dict().items()
        if t.is_floating_point()
    ]


def _cut_by_an_update(client, gen, payload, version) -> dict:
    """Generate `payload` through `gen`; once its row decodes, pause the engine (abort), load new weights as
    `version`, and continue it."""

    async def main():
        task = asyncio.ensure_future(gen.generate(payload))
        deadline = time.monotonic() + 30
        while (load := client.get_load()[0])["num_reqs"] == load["num_waiting_reqs"]:  # until its row decodes
            assert time.monotonic() < deadline
            await asyncio.sleep(0.002)
        await asyncio.to_thread(client.pause, "abort")
        await asyncio.to_thread(client.update_weights_from_tensor, _new_weights(), version)
        await asyncio.to_thread(client.resume)
        return await task

    return asyncio.run(main())


def test_a_cut_request_keeps_its_prefix_and_continues_under_the_new_weights(client):
    payload = _payload(seed=11)
    reference = _decoded(client.post("/generate", payload))  # the whole answer under the old weights (version 0)
    assert client.server_info()["weight_version"] == 0

    async def post(body):
        return await asyncio.to_thread(client.post, "/generate", body)

    gen = SampleGenerator(RolloutConfig(), None, post, seed=0, partial_rollout=True)
    merged = _cut_by_an_update(client, gen, payload, version=1)
    meta, ref_meta = merged["meta_info"], reference["meta_info"]
    versions = meta["weight_versions"]
    n = versions.count(0)
    assert 0 < n < LENGTH and versions == [0] * n + [1] * (LENGTH - n), "the update did not land mid-request"
    assert gen.counters.continued == 1 and meta["partial_segments"] == 2
    # the prefix is exactly what the old weights produced
    assert merged["output_ids"][:n] == reference["output_ids"][:n]
    assert meta["output_token_logprobs"][:n] == ref_meta["output_token_logprobs"][:n]
    rows = len(PROMPT) + n - 1  # positions the first segment decided
    assert np.array_equal(meta["routed_experts"][:rows], ref_meta["routed_experts"][:rows])
    assert len(merged["output_ids"]) == LENGTH and meta["finish_reason"]["type"] == "length"
    assert len(meta["routed_experts"]) == len(PROMPT) + LENGTH - 1
    # the rest is what a fresh request on prompt + prefix gives under the new weights (same continuation seed)
    first = {"output_ids": merged["output_ids"][:n], "meta_info": {"weight_version": 0}}
    rest = _decoded(client.post("/generate", partial.continuation(payload, [first])))
    assert rest["meta_info"]["weight_version"] == 1
    assert merged["output_ids"][n:] == rest["output_ids"]
    assert meta["output_token_logprobs"][n:] == rest["meta_info"]["output_token_logprobs"]
    assert np.array_equal(meta["routed_experts"][rows:], rest["meta_info"]["routed_experts"][rows:])

    sample = gen.from_answer(_template(), merged, routed=True)
    assert sample.token_versions == versions and sample.weight_version == 0 and sample.staleness(1) == 1


def test_without_partial_rollout_a_cut_request_starts_again_on_the_new_weights(client):
    async def post(body):
        return await asyncio.to_thread(client.post, "/generate", body)

    gen = SampleGenerator(RolloutConfig(), None, post, seed=0, partial_rollout=False)
    out = _cut_by_an_update(client, gen, _payload(seed=12), version=client.server_info()["weight_version"] + 1)
    assert "weight_versions" not in out["meta_info"] and len(out["output_ids"]) == LENGTH
    assert out["meta_info"]["weight_version"] == client.server_info()["weight_version"]
    assert gen.counters.retried == 1 and gen.counters.continued == 0


def _decoded(answer: dict) -> dict:
    answer["meta_info"]["routed_experts"] = routed_experts.decode(answer["meta_info"])
    return answer


def _template():
    from glm_rl.rollout.samples import Sample

    return Sample(index=0, group=0, prompt_ids=PROMPT, response_ids=[], rollout_logprobs=[])


def test_an_update_during_a_batch_is_staged_and_the_sender_does_not_wait(client):
    """The fully-async sync pushes while engines generate: the push returns before the running batch ends, the
    batch finishes on the old weights, the checksum already answers for the new ones, and the next batch uses
    them."""
    from glm_rl.weights.wire import tensor_checksum

    old = client.server_info()["weight_version"]
    new = [(n, t + 0.01) for n, t in _new_weights()]
    result: dict = {}

    async def main():
        task = asyncio.ensure_future(asyncio.to_thread(client.post, "/generate", _payload(seed=13)))
        deadline = time.monotonic() + 30
        while (load := client.get_load()[0])["num_reqs"] == load["num_waiting_reqs"]:  # until its row decodes
            assert time.monotonic() < deadline
            await asyncio.sleep(0.002)
        result["push"] = await asyncio.to_thread(client.update_weights_from_tensor, new, old + 1)
        result["running_after_push"] = client.get_load()[0]["num_reqs"]
        result["checksum"] = await asyncio.to_thread(client.weights_checksum, [new[0][0]])
        return await task

    answer = asyncio.run(main())
    assert "staged" in result["push"]["message"] and result["push"]["weight_version"] == old + 1
    assert result["running_after_push"] == 1  # the push came back while the batch still decoded
    assert answer["meta_info"]["weight_version"] == old  # that batch finished on the old weights
    assert result["checksum"]["weight_version"] == old + 1
    assert result["checksum"]["checksums"][new[0][0]] == tensor_checksum(new[0][1], "sha256")
    after = client.post("/generate", _payload(seed=14))
    assert after["meta_info"]["weight_version"] == old + 1
    fresh = EmbeddedEngine(EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT)))
    try:
        fresh_client = EngineClient(fresh.start(), timeout=60)
        fresh_client.update_weights_from_tensor(new, old + 1)
        assert fresh_client.post("/generate", _payload(seed=14))["output_ids"] == after["output_ids"]
    finally:
        fresh.shutdown()
