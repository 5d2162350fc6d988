"""OpenAI-compatible sessions (glm_rl/rollout/agentic/session*.py, openai_agent.py) with real parts: the real
embedded engine, the real `openai` client, the chat template, and the framework's `SampleGenerator` hook path.

The checkpoint is the tool demo's (GLM-4.5's tags as tokens) taught, in a few seconds of Adam on one
conversation, to answer `12*34` with a `calculator` call and then `408`: the tiny model never writes a tool call
on its own, and greedy decoding of the taught model does, so the agent's turn 1 really ends in `tool_calls`."""

from __future__ import annotations

import asyncio
import functools
import json

import aiohttp
import numpy as np
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from glm_rl.config import RolloutConfig
from glm_rl.config.agentic import AgenticConfig
from glm_rl.engine import EmbeddedEngine, EngineConfig
from glm_rl.rollout.agentic import openai_agent
from glm_rl.rollout.agentic.demo import make_checkpoint
from glm_rl.rollout.agentic.session import SessionError
from glm_rl.rollout.agentic.session_server import shared_server, stop_shared_server
from glm_rl.rollout.agentic.tools import CALCULATOR, calculate
from glm_rl.rollout.data import prompt_ids
from glm_rl.rollout.engine_client import EngineClient
from glm_rl.rollout.generation import HookError, RolloutAborted, SampleGenerator, SamplingSpec
from glm_rl.rollout.hooks import GenerateContext
from glm_rl.rollout.samples import Sample

TOOLS = [CALCULATOR.schema()]
TAUGHT = [
    {"role": "user", "content": "12*34"},
    {
        "role": "assistant",
        "content": "12*34=?",
        "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "12*34"}}}],
    },
    {"role": "tool", "content": "408"},
    {"role": "assistant", "content": "408"},
]
GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 40, "sampling_seed": 5}
AGENT = "test_agentic_session.calculator_agent"
RESPONSES: dict[str, list] = {}  # session id -> the ChatCompletions the agent got


def teach(ckpt) -> None:
    """Overfit the non-expert weights on TAUGHT (written back under the checkpoint's own tensor names)."""
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    ids = torch.tensor([tok.apply_chat_template(TAUGHT, tools=TOOLS, tokenize=True, return_dict=False)])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    tensors = load_file(str(ckpt / "model.safetensors"))
    for name, p in model.named_parameters():
        p.requires_grad_(name in tensors)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(200):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01
    state = model.state_dict()
    tensors.update({n: state[n].detach().contiguous() for n in tensors if n in state})
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("session") / "checkpoint", warm=None)  # trained below instead
    teach(path)
    return path


@pytest.fixture(scope="module")
def tok(ckpt):
    return AutoTokenizer.from_pretrained(str(ckpt))


@pytest.fixture(scope="module")
def engine_url(ckpt):
    eng = EmbeddedEngine(EngineConfig(hf_checkpoint=str(ckpt), return_routed_experts_by_default=True))
    yield eng.start()
    eng.shutdown()


def logged_generate(url):
    client, log = EngineClient(url), []

    async def generate(payload):
        out = await client.apost("/generate", payload)
        log.append((payload, out))
        return out

    return generate, log


def template(tok, index=0) -> Sample:
    return Sample(
        index=index,
        group=0,
        prompt_ids=prompt_ids(tok, "12*34", tools=TOOLS),
        response_ids=[],
        rollout_logprobs=[],
        label="408",
        metadata={"prompt": "12*34"},
        tools=TOOLS,
    )


def run(coro):
    async def main():
        try:
            return await coro
        finally:
            await stop_shared_server()

    return asyncio.run(main())


async def calculator_agent(client: openai.AsyncOpenAI, sample: openai_agent.SampleInfo) -> str:
    """A plain OpenAI tool-use agent: call the model, run its tool calls, answer, then one more user turn."""
    got = RESPONSES.setdefault(sample.session_id, [])
    messages = list(sample.messages)
    r1 = await client.chat.completions.create(model=sample.model, messages=messages, tools=sample.tools)
    got.append(r1)
    msg = r1.choices[0].message
    messages.append(msg.model_dump(exclude_none=True))
    for call in msg.tool_calls or []:
        result = calculate(**json.loads(call.function.arguments))
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    r2 = await client.chat.completions.create(model=sample.model, messages=messages, tools=sample.tools)
    got.append(r2)
    messages += [r2.choices[0].message, {"role": "user", "content": "1+2"}]  # the pydantic message itself
    r3 = await client.chat.completions.create(model=sample.model, messages=messages, tools=sample.tools)
    got.append(r3)
    return r2.choices[0].message.content


def _agent_generator(tok, generate, cfg: AgenticConfig) -> SampleGenerator:
    """A SampleGenerator running the OpenAI-agent hook, as the rollout manager builds it."""
    hook = "glm_rl.rollout.agentic.openai_agent.generate"
    return SampleGenerator(
        RolloutConfig(custom_generate_function_path=hook), tok, generate, seed=0, custom_fn=openai_agent.generate,
        agentic=cfg,
    )  # fmt: skip


def test_agent_session_is_one_token_exact_sample(engine_url, tok):
    generate, log = logged_generate(engine_url)
    cfg = AgenticConfig(custom_agent_function_path=AGENT, max_turns=4)
    gen = _agent_generator(tok, generate, cfg)
    spec = SamplingSpec(temperature=0.0, top_p=1.0, top_k=-1, max_new_tokens=40, routed=True, rid_prefix="s")
    [s] = run(gen.sample(template(tok), spec, step=0))

    r1, r2, r3 = RESPONSES[s.metadata["episode"]["session"]]
    assert r1.choices[0].finish_reason == "tool_calls" and r1.choices[0].message.content == "12*34=?"
    [call] = r1.choices[0].message.tool_calls
    assert call.function.name == "calculator" and json.loads(call.function.arguments) == {"expression": "12*34"}
    assert r2.choices[0].message.content == "408" and r2.choices[0].finish_reason == "stop"
    assert s.response_text == "408" and s.metadata["episode"]["turns"] == 3 and s.metadata["episode"]["tool_calls"] == 1

    assert len(log) == 3 and s.prompt_ids == log[0][0]["input_ids"] == template(tok).prompt_ids
    expected, mask, logprobs, added = [], [], [], []
    for payload, out in log:  # every request continues the exact ids so far: prompt + outputs + template spans
        new = payload["input_ids"][len(s.prompt_ids) + len(expected) :]
        assert payload["input_ids"] == s.prompt_ids + expected + new
        added.append(tok.decode(new, skip_special_tokens=False))
        n = len(out["output_ids"])
        expected += new + out["output_ids"]
        mask += [0] * len(new) + [1] * n
        logprobs += [0.0] * len(new) + [lp[0] for lp in out["meta_info"]["output_token_logprobs"]]
    assert added[1:] == [
        "<|observation|>\n<tool_response>\n408\n</tool_response><|assistant|>\n",
        "<|user|>\n1+2<|assistant|>\n",
    ]
    assert s.response_ids == expected and s.loss_mask == mask and s.rollout_logprobs == logprobs
    assert s.routed_experts.shape == (s.num_positions, 3, 2)
    assert [len(p["input_ids"]) + len(o["output_ids"]) - 1 for p, o in log][-1] == s.num_positions


def test_rewritten_assistant_turn_is_a_400_naming_turn_and_position(engine_url, tok):
    generate, log = logged_generate(engine_url)
    ctx = GenerateContext(RolloutConfig(), tok, generate, return_routed_experts=False, step=0, seed=0)

    async def rewriter(client, sample):
        messages = list(sample.messages)
        r1 = await client.chat.completions.create(model=sample.model, messages=messages, tools=sample.tools)
        msg = r1.choices[0].message.model_dump(exclude_none=True)
        msg["content"] = msg["content"].replace("34", "35")  # "12*34=?" -> "12*35=?"
        messages += [msg, {"role": "tool", "content": "408"}]
        await client.chat.completions.create(model=sample.model, messages=messages, tools=sample.tools)

    with pytest.raises(openai.BadRequestError) as e:
        run(openai_agent.run_agent(rewriter, ctx, template(tok), GREEDY, AgenticConfig()))
    prompt = len(template(tok).prompt_ids)
    message = e.value.body["message"]
    assert e.value.status_code == 400 and e.value.body["code"] == "session_prefix_mismatch"
    assert "turn 2: the messages do not extend" in message and "inside turn 1's generated output" in message
    assert f"first difference at token {prompt + 4}" in message  # "12*3" then the changed digit
    assert len(log) == 1  # never sent to the engine


async def _post(url, body, headers=None):
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/chat/completions", data=body, headers=headers or {}) as r:
            return r.status, await r.json()


def test_bad_requests_get_clear_errors(engine_url, tok):
    generate, log = logged_generate(engine_url)
    user = [{"role": "user", "content": "12*34"}]

    async def main():
        server = await shared_server()
        server.open("S1", tokenizer=tok, generate=generate, sampling_params=dict(GREEDY))
        h = {"X-Session-Id": "S1"}
        cases = {
            "not json": ("{", h),
            "messages": (json.dumps({"messages": "hi"}), h),
            "messages[0]": (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), h),
            "arguments": (
                json.dumps(
                    {
                        "messages": user
                        + [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}]
                    }
                ),
                h,
            ),
            "temperature": (json.dumps({"messages": user, "temperature": 0.7}), h),
            "stream": (json.dumps({"messages": user, "stream": True}), h),
            "no session id": (json.dumps({"messages": user}), {}),
            "differ": (json.dumps({"messages": user, "user": "S2"}), h),
            "unknown session": (json.dumps({"messages": user}), {"X-Session-Id": "nope"}),
        }
        answers = {k: await _post(server.url, body, hdr) for k, (body, hdr) in cases.items()}
        ok = await _post(server.url, json.dumps({"messages": user, "user": "S1", "max_tokens": 3}))  # id from `user`
        server.close("S1")
        gone = await _post(server.url, json.dumps({"messages": user}), h)
        return answers, ok, gone

    answers, ok, gone = run(main())
    for key, (status, body) in answers.items():
        expected = 404 if key == "unknown session" else 400
        assert status == expected, (key, body)
        assert body["error"]["message"], key
    msg = {k: b["error"]["message"] for k, (_, b) in answers.items()}
    assert "not valid JSON" in msg["not json"]
    assert "messages: expected a non-empty list" in msg["messages"] and "str" in msg["messages"]
    assert msg["messages[0]"].startswith("messages[0]:") and "'robot'" in msg["messages[0]"]
    assert "messages[1].tool_calls[0].function.arguments: not JSON" in msg["arguments"]
    assert "temperature 0.0" in msg["temperature"] and "got 0.7" in msg["temperature"]
    assert "stream" in msg["stream"] and "X-Session-Id" in msg["no session id"] and "differ" in msg["differ"]
    assert "unknown session 'nope'" in msg["unknown session"]
    assert ok[0] == 200 and ok[1]["usage"]["completion_tokens"] <= 3 and len(log) == 1
    assert gone[0] == 404  # a finished session is no longer served


def test_agent_hook_errors_name_the_flag(engine_url, tok):
    with pytest.raises(ValueError, match="--custom-agent-function-path 'no_such_module.agent': cannot import"):
        AgenticConfig(custom_agent_function_path="no_such_module.agent")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        AgenticConfig(custom_agent_function_path="glm_rl.rollout.agentic.tools.missing")
    generate, _ = logged_generate(engine_url)
    ctx = GenerateContext(RolloutConfig(), tok, generate, return_routed_experts=False, step=0, seed=0)
    with pytest.raises(ValueError, match="needs --custom-agent-function-path"):
        run(openai_agent.generate(ctx, template(tok), GREEDY))

    async def silent(client, sample):
        return "nothing asked"

    with pytest.raises(SessionError, match="made no chat completion request"):
        run(openai_agent.run_agent(silent, ctx, template(tok), GREEDY, AgenticConfig()))


def test_turns_past_max_turns_answer_length_and_end_the_sample(engine_url, tok):
    generate, log = logged_generate(engine_url)
    ctx = GenerateContext(RolloutConfig(), tok, generate, return_routed_experts=False, step=0, seed=0)
    seen = []

    async def chatty(client, sample):
        messages = list(sample.messages)
        for _ in range(2):
            r = await client.chat.completions.create(model=sample.model, messages=messages, tools=sample.tools)
            seen.append(r.choices[0])
            messages += [r.choices[0].message.model_dump(exclude_none=True), {"role": "tool", "content": "408"}]

    s = run(openai_agent.run_agent(chatty, ctx, template(tok), GREEDY, AgenticConfig(max_turns=1)))
    assert len(log) == 1 and seen[1].finish_reason == "length" and seen[1].message.content == ""
    assert s.finish_reason == "length" and s.metadata["episode"]["stopped"] == "max_turns"
    assert s.response_ids == log[0][1]["output_ids"] and s.loss_mask == [1] * len(s.response_ids)
    assert np.all(np.asarray(s.rollout_logprobs) <= 0.0)


def test_agent_failure_is_a_hook_error(engine_url, tok):
    generate, _ = logged_generate(engine_url)
    gen = _agent_generator(tok, generate, AgenticConfig(custom_agent_function_path="test_agentic_session.broken_agent"))
    spec = SamplingSpec(temperature=0.0, top_p=1.0, top_k=-1, max_new_tokens=8, routed=False, rid_prefix="s")
    with pytest.raises(HookError, match="openai_agent.generate raised on sample s0-0: NotFoundError"):
        run(gen.sample(template(tok), spec, step=0))


async def broken_agent(client, sample):
    """Talks to a session that is not its own: 404."""
    await client.chat.completions.create(
        model=sample.model, messages=[{"role": "user", "content": "1"}], extra_headers={"X-Session-Id": "other"}
    )


def test_rollout_abort_propagates_through_the_agent(tok):
    """Dynamic sampling's abort reaches the agent as an HTTP 503; the hook re-raises the rollout's RolloutAborted
    (the group is discarded), whether the agent lets the error out or swallows it."""

    async def aborted(payload):
        raise RolloutAborted(f"request {payload['rid']} aborted (surplus of dynamic sampling)")

    ctx = GenerateContext(RolloutConfig(), tok, aborted, return_routed_experts=False, step=0, seed=0)
    statuses = []

    async def agent(client, sample, swallow):
        try:
            await client.chat.completions.create(model=sample.model, messages=sample.messages)
        except openai.InternalServerError as e:
            statuses.append(e.status_code)
            if not swallow:
                raise

    for swallow in (False, True):
        fn = functools.partial(agent, swallow=swallow)
        with pytest.raises(RolloutAborted, match="surplus of dynamic sampling"):
            run(openai_agent.run_agent(fn, ctx, template(tok), GREEDY, AgenticConfig()))
    assert statuses == [503, 503]


def test_a_failed_engine_request_can_be_sent_again(engine_url, tok):
    """An engine failure is a 502 that records nothing: the agent's retry of the same messages continues."""
    generate, log = logged_generate(engine_url)
    failures = iter([RuntimeError("connection reset")])

    async def flaky(payload):
        err = next(failures, None)
        if err is not None:
            raise err
        return await generate(payload)

    ctx = GenerateContext(RolloutConfig(), tok, flaky, return_routed_experts=False, step=0, seed=0)
    codes = []

    async def retrying(client, sample):
        for _ in range(2):
            try:
                return await client.chat.completions.create(model=sample.model, messages=sample.messages)
            except openai.InternalServerError as e:
                codes.append((e.status_code, e.body["code"]))

    s = run(openai_agent.run_agent(retrying, ctx, template(tok), GREEDY, AgenticConfig()))
    assert codes == [(502, "engine_error")] and len(log) == 1
    assert s.tokens == log[0][0]["input_ids"] + log[0][1]["output_ids"] and s.metadata["episode"]["turns"] == 1


def test_the_agent_flag_selects_its_hook_and_refuses_another():
    from glm_rl.config import parse_args
    from glm_rl.rollout.manager import OPENAI_AGENT_HOOK

    agent = "glm_rl.rollout.agentic.tools.call_tool"  # callable: the check at parse time resolves it
    cfg = parse_args(["--custom-agent-function-path", agent])
    assert cfg.rollout.custom_generate_function_path is None  # the rollout manager runs OPENAI_AGENT_HOOK
    assert OPENAI_AGENT_HOOK == f"{openai_agent.__name__}.generate"
    assert parse_args(["--custom-agent-function-path", agent, "--custom-generate-function-path", OPENAI_AGENT_HOOK])
    with pytest.raises(ValueError, match="would replace it"):
        parse_args(
            [
                "--custom-agent-function-path",
                agent,
                "--custom-generate-function-path",
                "glm_rl.rollout.agentic.tool_loop.generate",
            ]
        )
