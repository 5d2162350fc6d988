"""The tool loop against the real in-process embedded engine and the real torch trainer backend: 2- and 3-turn
episodes are token-exact (the trainer's ids are every turn's engine ids plus the observation ids, nothing
re-tokenised), R3 replay agrees 1.0 and fp32 logprobs match the engine's on generated tokens (<= 1e-5).

The tiny checkpoint never writes a tool call on its own, so these tests hand `run_episode` a parser that reads
every turn as a `calculator` call (the real engine, tools, template and trainer do the rest); the GLM-4.5
parser itself is tested in test_agentic_format.py."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from transformers import AutoTokenizer

from glm_rl.config import AlgoConfig, ModelConfig, RolloutConfig, TrainConfig
from glm_rl.config.agentic import AgenticConfig
from glm_rl.engine import EmbeddedEngine, EngineConfig
from glm_rl.models.glm45.presets import TINY_CHECKPOINT
from glm_rl.rollout.agentic.glm45_format import ParsedTurn, ToolCall, observation_ids, parse_turn
from glm_rl.rollout.agentic.tool_loop import run_episode, tools_for
from glm_rl.rollout.data import prompt_ids
from glm_rl.rollout.engine_client import EngineClient
from glm_rl.rollout.hooks import GenerateContext
from glm_rl.rollout.samples import Sample
from glm_rl.trainer.backends.torch_backend import TorchBackend
from glm_rl.trainer.batching import collate


@pytest.fixture(scope="module")
def engine_url():
    eng = EmbeddedEngine(EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT), return_routed_experts_by_default=True))
    yield eng.start()
    eng.shutdown()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(TINY_CHECKPOINT))


def always_calls(text: str) -> ParsedTurn:
    return ParsedTurn(None, text, [ToolCall("calculator", {"expression": "6*7"})])


def episodes(url, tokenizer, max_turns: int, n: int = 3, parse=always_calls, max_ctx=None):
    client = EngineClient(url)
    log: list[tuple[dict, dict]] = []

    async def generate(payload):
        out = await client.apost("/generate", payload)
        log.append((payload, out))
        return out

    ctx = GenerateContext(
        rollout=RolloutConfig(), tokenizer=tokenizer, generate=generate, return_routed_experts=True, step=0, seed=1
    )
    cfg = AgenticConfig(max_turns=max_turns, rollout_max_context_len=max_ctx)

    async def run():
        jobs = []
        for i in range(n):
            sample = Sample(
                index=i,
                group=i,
                prompt_ids=prompt_ids(tokenizer, f"{i + 2}+{3 * i}"),
                response_ids=[],
                rollout_logprobs=[],
                label=str(5 * i + 2),
            )
            params = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 24, "sampling_seed": 11 + i}
            jobs.append(run_episode(ctx, sample, params, cfg, tools_for(cfg), parse=parse))
        return await asyncio.gather(*jobs)

    return asyncio.run(run()), log


@pytest.mark.parametrize("turns", [2, 3])
def test_trajectory_is_the_engine_ids_plus_observation_ids(engine_url, tokenizer, turns):
    samples, log = episodes(engine_url, tokenizer, turns)
    obs = observation_ids(tokenizer, ["42"], None)  # calculator("6*7") after a turn ending in <|endoftext|>
    for s in samples:
        calls = [(p, o) for p, o in log if p["rid"].split("-")[1] == str(s.index)]
        calls.sort(key=lambda po: po[0]["rid"])
        assert len(calls) == turns == s.metadata["episode"]["turns"]
        expected, mask = list(s.prompt_ids), []
        for k, (payload, out) in enumerate(calls):
            assert payload["input_ids"] == expected  # each turn continues the exact ids so far
            expected += out["output_ids"]
            mask += [1] * len(out["output_ids"])
            if k < turns - 1:
                expected += obs
                mask += [0] * len(obs)
        assert s.tokens == expected and s.loss_mask == mask
        assert len(s.rollout_logprobs) == len(s.response_ids)
        assert all(lp == 0.0 for lp, m in zip(s.rollout_logprobs, mask) if m == 0)
        assert s.routed_experts.shape == (s.num_positions, 3, 2)
        mb = collate([s], tokenizer.pad_token_id)
        assert mb.input_ids[0].tolist() == expected[:-1] and mb.targets[0].tolist() == expected[1:]
        assert mb.loss_mask[0, len(s.prompt_ids) - 1 :].tolist() == mask


@pytest.mark.parametrize("turns", [2, 3])
def test_trainer_replays_r3_and_matches_engine_logprobs(engine_url, tokenizer, turns):
    samples, _ = episodes(engine_url, tokenizer, turns)
    backend = TorchBackend(ModelConfig(), TrainConfig(), AlgoConfig(), temperature=1.0)
    out = backend.logprobs(samples)
    assert out["replay_total"] > 0 and out["replay_agree"] == out["replay_total"]  # agreement 1.0
    for s in samples:
        old = out["old"][s.index]
        assert len(old) == len(s.response_ids)
        gen = np.asarray(s.loss_mask, dtype=bool)
        assert np.abs(old[gen] - np.asarray(s.rollout_logprobs)[gen]).max() <= 1e-5


def test_context_limit_stops_before_an_observation_that_does_not_fit(engine_url, tokenizer):
    samples, _ = episodes(engine_url, tokenizer, 3, n=1, max_ctx=24)
    s = samples[0]
    assert len(s.tokens) <= 24 and s.finish_reason == "length"
    assert s.loss_mask[-1] == 1  # never ends on an observation


def test_real_parser_single_turn_is_plain_generation(engine_url, tokenizer):
    """With the GLM-4.5 parser the tiny model answers without tool calls: one turn, all tokens trained on."""
    samples, log = episodes(engine_url, tokenizer, 4, n=2, parse=parse_turn)
    for s in samples:
        assert s.metadata["episode"]["turns"] == 1 and s.loss_mask == [1] * len(s.response_ids)
    assert len(log) == 2
