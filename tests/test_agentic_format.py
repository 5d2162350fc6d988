"""GLM-4.5 tool-call format: parser (malformed input becomes errors, never exceptions), the tiny chat template's
thinking / tools / observation structure (plain prompts unchanged), tools and the registry, the config section."""

from __future__ import annotations

import asyncio

import pytest
from transformers import AutoTokenizer

from glm_rl.config.agentic import AgenticConfig
from glm_rl.models.glm45.presets import TINY_CHECKPOINT
from glm_rl.rollout.agentic.glm45_format import ToolCall, observation_ids, observation_text, parse_turn, render_call
from glm_rl.rollout.agentic.sandbox import SandboxLimits
from glm_rl.rollout.agentic.tools import CALCULATOR, TOOLS, call_tool, load_tools

GLM_TURN = (
    "<think>12*34 is hard</think>\nLet me compute.\n<tool_call>calculator\n<arg_key>expression</arg_key>\n"
    "<arg_value>12*34</arg_value>\n</tool_call>\n<tool_call>lookup\n<arg_key>n</arg_key>\n"
    '<arg_value>3</arg_value>\n<arg_key>opts</arg_key>\n<arg_value>{"a": [1, 2]}</arg_value>\n'
    "</tool_call><|observation|>"
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(TINY_CHECKPOINT))


def test_parses_glm45_turn():
    t = parse_turn(GLM_TURN)
    assert t.thinking == "12*34 is hard" and t.content == "Let me compute." and t.errors == []
    assert t.calls == [
        ToolCall("calculator", {"expression": "12*34"}),
        ToolCall("lookup", {"n": 3, "opts": {"a": [1, 2]}}),
    ]


def test_render_call_roundtrips():
    call = ToolCall("lookup", {"n": 3, "s": "x y", "opts": {"a": [1]}})
    assert parse_turn(render_call(call)).calls == [call]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("<tool_call>calculator\n<arg_key>expression</arg_key>\n<arg_value>1+1</arg_value>", "without </tool_call>"),
        ("<tool_call>\n<arg_key>x</arg_key>\n<arg_value>1</arg_value>\n</tool_call>", "no tool name"),
        ("<tool_call>calculator\n<arg_key>expression</arg_key>\n</tool_call>", "expected <arg_key>"),
        (
            "<tool_call>calculator\n<arg_key>a</arg_key><arg_value>1</arg_value><arg_key>a</arg_key><arg_value>2</arg_value>"
            "</tool_call>",
            "given twice",
        ),
        ("answer </tool_call>", "without <tool_call>"),
    ],
)
def test_malformed_calls_become_errors(text, fragment):
    t = parse_turn(text)
    assert t.calls == [] and len(t.errors) == 1 and fragment in t.errors[0]


def test_plain_prompt_rendering_unchanged(tokenizer):
    msgs = [
        {"role": "system", "content": "1"},
        {"role": "user", "content": "2+2"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3"},
    ]
    assert (
        tokenizer.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=True)
        == "[gMASK]<sop><|user|>\n2+2<|assistant|>\n"
    )
    assert (
        tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        == "[gMASK]<sop><|system|>\n1<|user|>\n2+2<|assistant|>\n4<|endoftext|><|user|>\n3+3<|assistant|>\n"
    )


def test_template_renders_tools_thinking_calls_and_observations(tokenizer):
    msgs = [
        {"role": "user", "content": "12*34"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "hard",
            "tool_calls": [
                {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "12*34"}}}
            ],
        },
        {"role": "tool", "content": "408"},
        {"role": "tool", "content": "1"},
        {"role": "assistant", "content": "408"},
    ]
    text = tokenizer.apply_chat_template(msgs, tools=[CALCULATOR.schema()], tokenize=False)
    assert text == (
        "[gMASK]<sop><|system|>\n<tools>calculator</tools><|user|>\n12*34<|assistant|>\n<think>hard</think>"
        "\n<tool_call>calculator\n<arg_key>expression</arg_key>\n<arg_value>12*34</arg_value>\n</tool_call>"
        "<|endoftext|><|observation|>\n<tool_response>\n408\n</tool_response>\n<tool_response>\n1\n"
        "</tool_response><|assistant|>\n408<|endoftext|>"
    )
    assert parse_turn(text.split("<|assistant|>\n")[1]).calls == [ToolCall("calculator", {"expression": "12*34"})]


def test_observation_turn_is_rendered_alone(tokenizer):
    text = observation_text(tokenizer, ["408"])
    assert text == "<|observation|>\n<tool_response>\n408\n</tool_response><|assistant|>\n"
    ids = observation_ids(tokenizer, ["408"], last_generated_id=tokenizer.eos_token_id)
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    obs_id = tokenizer.convert_tokens_to_ids("<|observation|>")  # GLM-4.5 stops on <|observation|>: not doubled
    assert observation_ids(tokenizer, ["408"], last_generated_id=obs_id) == ids[1:]


def test_tools_never_raise():
    registry = {t.name: t for t in TOOLS}
    limits = SandboxLimits()

    def call(name, **args):
        return asyncio.run(call_tool(registry, ToolCall(name, args), limits))

    assert call("calculator", expression="12*34") == "408"
    assert call("calculator", expression=7) == "7"
    assert call("calculator", expression="__import__('os')").startswith("error: calculator raised ValueError")
    assert call("calculator", expression="1/0").startswith("error: calculator raised ZeroDivisionError")
    assert call("calculator", wrong="1").startswith("error: bad arguments for calculator")
    assert call("search", q="x") == "error: unknown tool 'search'; available: calculator, python"


def test_tools_path_loads_and_names_bad_paths():
    assert set(load_tools("glm_rl.rollout.agentic.tools.TOOLS")) == {"calculator", "python"}
    with pytest.raises(ValueError, match="--tools-path no_such_module.TOOLS"):
        load_tools("no_such_module.TOOLS")
    with pytest.raises(TypeError, match="expected a list"):
        load_tools("glm_rl.rollout.agentic.tools.CALCULATOR")


def test_max_turns_zero_rejected():
    with pytest.raises(ValueError, match=r"--max-turns must be >= 1 \(got 0\)"):
        AgenticConfig(max_turns=0)
    with pytest.raises(ValueError, match="--rollout-max-context-len"):
        AgenticConfig(rollout_max_context_len=1)
    assert AgenticConfig(max_turns=1).errors() == []
