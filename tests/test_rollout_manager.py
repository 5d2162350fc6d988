"""Rollout manager against a real in-process embedded engine (HTTP): groups, rewards, long-prompt skipping,
resumable data order."""

import asyncio
import dataclasses

import pytest

from glm_rl.config import RolloutConfig
from glm_rl.engine import EmbeddedEngine, EngineConfig
from glm_rl.models.glm45.presets import TINY_CHECKPOINT
from glm_rl.rollout.engine_client import EngineClient
from glm_rl.rollout.manager import RolloutManager
from glm_rl.rollout.rewards import arithmetic_reward


@pytest.fixture(scope="module")
def engine():
    eng = EmbeddedEngine(EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT), return_routed_experts_by_default=True))
    url = eng.start()
    yield url
    eng.shutdown()


def manager(url, **overrides):
    client = EngineClient(url)
    cfg = dataclasses.replace(RolloutConfig(rollout_batch_size=4, n_samples_per_prompt=3), **overrides)
    return RolloutManager(
        cfg,
        str(TINY_CHECKPOINT),
        lambda payload: client.apost("/generate", payload),
        seed=7,
        return_routed_experts=True,
    )


def test_groups_rewards_and_routing(engine):
    m = manager(engine)
    samples, metrics = asyncio.run(m.generate(0))
    assert len(samples) == 12 and [s.index for s in samples] == list(range(12))
    assert [s.group for s in samples] == [g for g in range(4) for _ in range(3)]
    for s in samples:
        text = m.tokenizer.decode(s.response_ids, skip_special_tokens=True)
        label = str(sum(int(x) for x in m.tokenizer.decode(s.prompt_ids, skip_special_tokens=True).split("+")))
        assert s.reward == arithmetic_reward(text, label)
        assert len(s.rollout_logprobs) == len(s.response_ids)
        assert s.routed_experts.shape == (s.num_positions, 3, 2)
    assert metrics["rollout/reward_mean"] == pytest.approx(sum(s.reward for s in samples) / 12)
    assert metrics["rollout/skipped_long_prompts"] == 0


def test_long_prompts_are_skipped_and_counted(engine):
    m = manager(engine, rollout_max_prompt_len=11)  # "a+b" longer than 5 characters does not fit
    samples, metrics = asyncio.run(m.generate(0))
    assert len(samples) == 12 and all(len(s.prompt_ids) <= 11 for s in samples)
    assert metrics["rollout/skipped_long_prompts"] > 0


def test_data_position_resumes(engine):
    a = manager(engine)
    asyncio.run(a.generate(0))
    state = a.data_state()
    after_a, _ = asyncio.run(a.generate(1))
    b = manager(engine)
    b.load_data_state(state)
    after_b, _ = asyncio.run(b.generate(1))
    assert [s.prompt_ids for s in after_a] == [s.prompt_ids for s in after_b]
    assert [s.response_ids for s in after_a] == [s.response_ids for s in after_b]  # seeded per (step, sample)


def test_mtp_acceptance_length_reaches_rollout_metrics():
    from glm_rl.engine import EmbeddedEngine, EngineConfig

    eng = EmbeddedEngine(
        EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT), enable_mtp=True, return_routed_experts_by_default=True)
    )
    url = eng.start()
    try:
        _, metrics = asyncio.run(manager(url, rollout_temperature=0.0).generate(0))
    finally:
        eng.shutdown()
    assert metrics["rollout/spec_accept_length"] >= 1.7


def test_episode_metrics_count_tool_calls_per_episode():
    from glm_rl.rollout.manager import _episode_metrics
    from glm_rl.rollout.samples import Sample

    def sample(**episode):
        s = Sample(index=0, group=0, prompt_ids=[1], response_ids=[2], rollout_logprobs=[0.0])
        s.metadata = {"episode": {"turns": 1, "tool_calls": 0, "tool_errors": 0, "malformed_calls": 0, **episode}}
        return s

    samples = [
        sample(tool_calls=1, turns=2),  # a good call
        sample(tool_calls=1, tool_errors=1, turns=2),  # a call the tool refused
        sample(malformed_calls=1),  # a call that did not parse
        sample(),  # an answer without a call
    ]
    assert _episode_metrics(samples) == {
        "rollout/tool_call_frac": 0.5,
        "rollout/wellformed_call_frac": 0.25,
        "rollout/malformed_call_frac": 0.25,
        "rollout/turns_mean": 1.5,
    }
    assert _episode_metrics([Sample(index=0, group=0, prompt_ids=[1], response_ids=[], rollout_logprobs=[])]) == {}
