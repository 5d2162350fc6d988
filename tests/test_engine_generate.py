"""EmbeddedEngine /generate over real HTTP against the HF model on the shipped tiny checkpoint (fp32, CPU)."""

from __future__ import annotations

import asyncio
import json
import threading

import aiohttp
import pytest
import torch

from glm_rl.engine import EmbeddedEngine, EngineConfig, routed_experts
from glm_rl.evaluate import chat_prompt_ids
from glm_rl.models.glm45.checkpoint import load_hf_model
from glm_rl.models.glm45.presets import ASSETS, TINY_CHECKPOINT
from glm_rl.rollout.engine_client import EngineClient


@pytest.fixture(scope="module")
def hf():
    model, tokenizer = load_hf_model(TINY_CHECKPOINT)
    return model, tokenizer


@pytest.fixture(scope="module")
def prompts(hf):
    rows = [json.loads(line) for line in (ASSETS / "arith" / "eval.jsonl").read_text().splitlines()[:6]]
    return [chat_prompt_ids(hf[1], r["prompt"]) for r in rows]


@pytest.fixture(scope="module")
def client():
    engine = EmbeddedEngine(EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT), seed=1234))
    url = engine.start()
    yield EngineClient(url, timeout=60)
    engine.shutdown()


def _recompute(model, tokens: list[int], temperature: float = 1.0):
    """Full-sequence forward: logprobs of tokens[1:] under log_softmax(logits / T), routers' top-k per position."""
    n_dense = model.config.first_k_dense_replace
    choices: list[torch.Tensor] = []
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda m, a, out: choices.append(out[2].clone()))
        for i, layer in enumerate(model.model.layers)
        if i >= n_dense
    ]
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokens[:-1]])).logits[0].float()
    finally:
        for h in hooks:
            h.remove()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    target = torch.tensor(tokens[1:])
    routed = torch.stack(choices, dim=1).sort(dim=-1).values  # [L-1, n_moe, top_k]
    return logp.gather(1, target[:, None])[:, 0], routed, logits


def _greedy(max_new: int = 12) -> dict:
    return {"temperature": 0.0, "max_new_tokens": max_new}


def test_greedy_matches_hf_generate_and_batched_equals_single(hf, prompts, client):
    model, _ = hf
    eos = model.generation_config.eos_token_id
    single = [client.generate(p, _greedy())["output_ids"] for p in prompts]
    for p, out in zip(prompts, single):
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0
            )[0, len(p) :].tolist()
        assert out == ref
    batched = client.generate(prompts, _greedy())
    assert [r["output_ids"] for r in batched] == single
    assert any(r["meta_info"]["finish_reason"]["type"] == "stop" for r in batched)
    stop = next(r for r in batched if r["meta_info"]["finish_reason"]["type"] == "stop")
    assert stop["output_ids"][-1] == stop["meta_info"]["finish_reason"]["matched"] in eos  # stop token kept


def test_scheduler_batches_waiting_requests(prompts, client):
    """Requests queued while paused all go into one batch; answers equal the single-request answers."""
    single = [client.generate(p, _greedy())["output_ids"] for p in prompts]
    before = client.server_info()["stats"]
    client.pause(mode="in_place")
    results: list = []
    thread = threading.Thread(target=lambda: results.extend(asyncio.run(_concurrent(client, prompts))))
    thread.start()
    _wait_until(lambda: client.get_load()[0]["num_waiting_reqs"] == len(prompts))
    client.resume()
    thread.join(timeout=30)
    assert [r["output_ids"] for r in results] == single
    after = client.server_info()["stats"]
    assert after["batches_total"] - before["batches_total"] == 1
    assert after["max_batch_rows"] >= len(prompts)


async def _concurrent(client, prompts):
    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*(client.agenerate(p, _greedy(), session=session) for p in prompts))


def _wait_until(condition, timeout_s: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_logprobs_and_routed_experts_match_full_recompute(hf, prompts, client, temperature):
    model, _ = hf
    n_moe = model.config.num_hidden_layers - model.config.first_k_dense_replace
    top_k = model.config.num_experts_per_tok
    params = {"temperature": temperature, "max_new_tokens": 10, "sampling_seed": 7}
    answers = client.generate(prompts[:4], params, return_logprob=True, return_routed_experts=True)  # padded
    for p, ans in zip(prompts, answers):
        out, meta = ans["output_ids"], ans["meta_info"]
        tokens = p + out
        logp, routed, _ = _recompute(model, tokens, temperature or 1.0)
        got = torch.tensor([lp for lp, _, _ in meta["output_token_logprobs"]])
        assert [t for _, t, _ in meta["output_token_logprobs"]] == out
        assert (got - logp[len(p) - 1 :]).abs().max().item() <= 1e-5
        experts = routed_experts.decode(meta)  # the compact wire form: one base64 buffer
        assert isinstance(meta["routed_experts"], str) and experts.shape == (len(tokens) - 1, n_moe, top_k)
        assert torch.equal(torch.from_numpy(experts).to(routed.dtype), routed)


def test_sampling_is_reproducible_and_seeded(prompts, client):
    params = {"temperature": 1.0, "max_new_tokens": 16, "ignore_eos": True, "sampling_seed": 11}
    a = client.generate(prompts[0], params)["output_ids"]
    b = client.generate(prompts[0], params)["output_ids"]
    c = client.generate(prompts[0], {**params, "sampling_seed": 12})["output_ids"]
    d = client.generate(prompts[0], {"temperature": 1.0, "max_new_tokens": 16, "ignore_eos": True}, rid="r-1")
    e = client.generate(prompts[0], {"temperature": 1.0, "max_new_tokens": 16, "ignore_eos": True}, rid="r-1")
    assert a == b and a != c
    assert d["output_ids"] == e["output_ids"] and d["meta_info"]["id"] == "r-1"


def test_sampling_params_are_respected(hf, prompts, client):
    model, _ = hf
    greedy = client.generate(prompts[0], _greedy(12))["output_ids"]
    sampled = {"temperature": 1.0, "max_new_tokens": 12, "sampling_seed": 3}
    assert client.generate(prompts[0], {**sampled, "top_k": 1})["output_ids"] == greedy
    assert client.generate(prompts[0], {**sampled, "top_p": 1e-6})["output_ids"] == greedy
    # max_new_tokens + ignore_eos
    long = client.generate(prompts[0], {**sampled, "max_new_tokens": 5, "ignore_eos": True})
    assert long["meta_info"]["completion_tokens"] == 5 and long["meta_info"]["finish_reason"]["type"] == "length"
    # stop_token_ids: stop at the first occurrence of a token greedy decoding emits
    j = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])
    stopped = client.generate(prompts[0], {**_greedy(12), "stop_token_ids": [greedy[j]]})
    assert stopped["output_ids"] == greedy[: j + 1]
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": greedy[j]}
    # top-k / top-p: every sampled token lies in the allowed set of the recomputed distribution
    for seed in range(3):
        for extra, allowed in (({"top_k": 3}, _top_k_set(3)), ({"top_p": 0.6}, _top_p_set(0.6))):
            out = client.generate(
                prompts[1],
                {"temperature": 1.0, "max_new_tokens": 20, "ignore_eos": True, "sampling_seed": seed, **extra},
            )["output_ids"]
            _, _, logits = _recompute(model, prompts[1] + out)
            for pos, token in enumerate(out):
                assert token in allowed(logits[len(prompts[1]) - 1 + pos]), (extra, pos)


def _top_k_set(k: int):
    return lambda logits: set(torch.topk(logits, k).indices.tolist())


def _top_p_set(p: float):
    def allowed(logits):
        probs, order = torch.sort(torch.softmax(logits, -1), descending=True)
        keep = (torch.cumsum(probs, -1) - probs) <= p + 1e-6
        return set(order[keep].tolist())

    return allowed
