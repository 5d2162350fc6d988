"""Tool-use demo checkpoint (glm_rl/rollout/agentic/demo.py): its tokenizer keeps the tiny model's ids and adds
GLM-4.5's tags as single tokens; the warm-start makes it call the calculator in some, not all, sampled episodes;
a 2-turn tool-loop rollout through the real engine on it is token-exact and the trainer's fp32 logprobs match
the engine's on generated tokens. (In that rollout the first turn is read as a `calculator` call on the prompt
whatever the model wrote, so the observation is the real tool's answer.)"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from glm_rl.config import AlgoConfig, ModelConfig, RolloutConfig, TrainConfig
from glm_rl.config.agentic import AgenticConfig
from glm_rl.engine import EmbeddedEngine, EngineConfig
from glm_rl.models.glm45.presets import TINY_CHECKPOINT
from glm_rl.rollout.agentic.demo import TOOLS, make_checkpoint, make_data
from glm_rl.rollout.agentic.glm45_format import ParsedTurn, ToolCall, observation_ids, parse_turn
from glm_rl.rollout.agentic.tool_loop import run_episode
from glm_rl.rollout.agentic.tools import as_registry, calculate
from glm_rl.rollout.data import load_prompts, prompt_ids
from glm_rl.rollout.engine_client import EngineClient
from glm_rl.rollout.hooks import GenerateContext
from glm_rl.rollout.samples import Sample
from glm_rl.trainer.backends.torch_backend import TorchBackend


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("tool-demo")
    return make_checkpoint(root / "checkpoint"), make_data(root / "train.jsonl", n=8)


def test_demo_tokenizer_extends_the_tiny_one(demo):
    ckpt, data = demo
    tiny, tok = AutoTokenizer.from_pretrained(str(TINY_CHECKPOINT)), AutoTokenizer.from_pretrained(str(ckpt))
    assert prompt_ids(tok, "12+34") == prompt_ids(tiny, "12+34")
    call = "<tool_call>calculator\n<arg_key>expression</arg_key>\n<arg_value>12*34</arg_value>\n</tool_call>"
    assert len(tok.encode(call, add_special_tokens=False)) == 16
    assert parse_turn(tok.decode(tok.encode(call, add_special_tokens=False))).calls == [
        ToolCall("calculator", {"expression": "12*34"})
    ]
    rows = load_prompts(data)
    a, b = (int(x) for x in rows[0].prompt.split("*"))
    assert rows[0].label == str(a * b) and rows[0].tools[0]["function"]["name"] == "calculator"
    assert json.loads((ckpt / "config.json").read_text())["vocab_size"] == 48


def test_warm_start_calls_the_tool_sometimes(demo):
    """At temperature 1 the checkpoint calls `calculator` (GLM-4.5's format, expression = the prompt) in some
    episodes and guesses in the others; its guesses are mostly wrong."""
    ckpt, _ = demo
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    ids = torch.tensor([prompt_ids(tok, "12*34", tools=[t.schema() for t in TOOLS])] * 64)  # (N, T)
    torch.manual_seed(0)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, max_new_tokens=32)
    turns = [parse_turn(tok.decode(o[ids.shape[1] :], skip_special_tokens=False)) for o in out]
    calls = [t for t in turns if t.calls or t.errors]
    right = [
        t
        for t in calls
        if [c.name for c in t.calls] == ["calculator"]
        and not t.errors
        and calculate(t.calls[0].arguments.get("expression", "")) == "408"
    ]
    guessed_right = [t for t in turns if not (t.calls or t.errors) and t.content.endswith("=408")]
    assert 0 < len(calls) < len(turns) // 2, [len(calls), len(turns)]
    assert len(right) >= len(calls) // 2, [len(right), len(calls)]
    assert len(guessed_right) <= (len(turns) - len(calls)) // 4


def test_two_turn_rollout_on_demo_checkpoint_is_token_exact(demo):
    ckpt, data = demo
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    eng = EmbeddedEngine(EngineConfig(hf_checkpoint=str(ckpt), return_routed_experts_by_default=True))
    url = eng.start()
    try:
        client, log = EngineClient(url), []

        async def generate(payload):
            log.append((payload, out := await client.apost("/generate", payload)))
            return out

        row = load_prompts(data)[0]
        ctx = GenerateContext(
            rollout=RolloutConfig(), tokenizer=tok, generate=generate, return_routed_experts=True, step=0, seed=0
        )
        sample = Sample(
            index=0,
            group=0,
            prompt_ids=prompt_ids(tok, row.prompt, tools=row.tools),
            response_ids=[],
            rollout_logprobs=[],
            label=row.label,
            tools=row.tools,
        )
        first = iter([ParsedTurn(None, "", [ToolCall("calculator", {"expression": row.prompt})])])
        s = asyncio.run(
            run_episode(
                ctx,
                sample,
                {"temperature": 1.0, "max_new_tokens": 24, "sampling_seed": 3},
                AgenticConfig(max_turns=2),
                as_registry(TOOLS, "demo"),
                parse=lambda text: next(first, parse_turn(text)),
            )
        )
    finally:
        eng.shutdown()
    assert len(log) == 2 == s.metadata["episode"]["turns"]
    obs = observation_ids(tok, [row.label], log[0][1]["output_ids"][-1])
    assert log[1][0]["input_ids"] == sample.prompt_ids + log[0][1]["output_ids"] + obs
    assert s.tokens == log[1][0]["input_ids"] + log[1][1]["output_ids"]
    backend = TorchBackend(ModelConfig(hf_checkpoint=str(ckpt)), TrainConfig(), AlgoConfig(), temperature=1.0)
    out = backend.logprobs([s])
    assert out["replay_agree"] == out["replay_total"] > 0
    gen = np.asarray(s.loss_mask, dtype=bool)
    assert np.abs(out["old"][0][gen] - np.asarray(s.rollout_logprobs)[gen]).max() <= 1e-5
