"""GLM-4.5's tool-call format, as its chat template writes it: parse a model turn, render an observation turn.

A model turn (the text of the ids the engine produced, special tokens kept):

    <think>reasoning</think>
    visible content
    <tool_call>NAME
    <arg_key>KEY</arg_key>
    <arg_value>VALUE</arg_value>
    ...
    </tool_call>

A value is JSON when it parses as JSON, else the raw string (GLM-4.5 writes string arguments raw and others
as JSON; SGLang's glm45 detector reads them the same way). Anything malformed — an unclosed `<tool_call>`, a
call without a name, a key without its value, stray text between arguments, a repeated key — becomes an
error string that the tool loop returns to the model as an observation; parsing never raises.

The observation turn is rendered by the checkpoint's own chat template: the text that a `tool` message (one
per result, consecutive ones sharing one `<|observation|>`) plus the generation prompt add after an anchor
conversation, tokenised on its own. Only that new turn is tokenised; earlier turns stay the ids the engine
produced (token in, token out). GLM-4.5 ends a calling turn with `<|observation|>` itself (a stop token);
`observation_ids` then leaves out the template's leading copy so the token is not doubled.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.S)
_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)
_ROLE_TOKENS = re.compile(r"<\|[a-z_]+\|>|\[gMASK\]|<sop>")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ParsedTurn:
    thinking: str | None  # inside <think>…</think> (None: no think block)
    content: str  # visible text: neither thinking, nor tool calls, nor role tokens
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # malformed calls, one message each


def _arg_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _parse_call(body: str) -> ToolCall | str:
    """One `<tool_call>` body → a call, or an error message."""
    head, sep, _ = body.partition("<arg_key>")
    name = head.strip()
    if not name or any(c in name for c in "<>\n "):
        return f"malformed tool call: no tool name after <tool_call> (got {body[:80]!r})"
    args_text = body[len(head) :]
    args: dict[str, Any] = {}
    for m in _ARG.finditer(args_text):
        key = m.group(1).strip()
        if key in args:
            return f"malformed tool call to {name!r}: argument {key!r} given twice"
        args[key] = _arg_value(m.group(2).strip())
    leftover = _ARG.sub("", args_text).strip()
    if leftover:
        return (
            f"malformed tool call to {name!r}: expected <arg_key>KEY</arg_key> <arg_value>VALUE</arg_value> "
            f"pairs, found {leftover[:80]!r}"
        )
    return ToolCall(name, args)


def parse_turn(text: str) -> ParsedTurn:
    """Thinking, visible content, tool calls and malformed-call errors of one model turn's text."""
    think = _THINK.search(text)
    thinking = think.group(1).strip() if think else None
    rest = _THINK.sub("", text)
    calls: list[ToolCall] = []
    errors: list[str] = []
    for m in _CALL.finditer(rest):
        parsed = _parse_call(m.group(1))
        (calls.append if isinstance(parsed, ToolCall) else errors.append)(parsed)
    outside = _CALL.sub("", rest)
    if "<tool_call>" in outside:
        errors.append("malformed tool call: <tool_call> without </tool_call>")
        outside = outside.split("<tool_call>", 1)[0]
    if "</tool_call>" in outside:
        errors.append("malformed tool call: </tool_call> without <tool_call>")
        outside = outside.replace("</tool_call>", "")
    content = _ROLE_TOKENS.sub("", outside).strip()
    return ParsedTurn(thinking, content, calls, errors)


def render_call(call: ToolCall) -> str:
    """A call as GLM-4.5's template writes it in an assistant turn (strings raw, other values as JSON)."""
    lines = [f"<tool_call>{call.name}"]
    for k, v in call.arguments.items():
        value = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
        lines += [f"<arg_key>{k}</arg_key>", f"<arg_value>{value}</arg_value>"]
    return "\n".join(lines) + "\n</tool_call>"


_ANCHOR = [{"role": "user", "content": "1"}]


def observation_text(tokenizer, results: list[str]) -> str:
    """The observation turn (one `tool` message per result) plus the generation prompt, as the chat template
    renders it after a conversation."""
    before = tokenizer.apply_chat_template(_ANCHOR, tokenize=False)
    tool_msgs = [{"role": "tool", "content": r} for r in results]
    after = tokenizer.apply_chat_template(_ANCHOR + tool_msgs, tokenize=False, add_generation_prompt=True)
    delta = after[len(before) :]
    if not after.startswith(before) or "<tool_response>" not in delta:
        raise ValueError(
            "the chat template does not render the `tool` role as GLM-4.5's "
            "<|observation|> <tool_response> turn; the tool loop needs it"
        )
    return delta


def observation_ids(tokenizer, results: list[str], last_generated_id: int | None) -> list[int]:
    """Token ids of the observation turn appended after a model turn ending in `last_generated_id`."""
    ids = tokenizer.encode(observation_text(tokenizer, results), add_special_tokens=False)
    observation = tokenizer.convert_tokens_to_ids("<|observation|>")
    if ids and last_generated_id == observation and ids[0] == observation:
        ids = ids[1:]  # the model already wrote <|observation|> (GLM-4.5 stops on it)
    return ids
