"""One OpenAI-style chat session over the engines, token in and token out (issue 18 item 5).

An agent written against the OpenAI API sends the whole conversation every turn; RL needs the exact tokens the
engine produced. A `Session` reconciles the two: each request's messages (and `tools`) are rendered by the
checkpoint's chat template, and the rendered ids must extend the session's ids so far (first prompt, every
generated output, every template-added span) token for token. A mismatch is a `SessionError` (HTTP 400) that
names the turn and the first differing position; nothing is ever re-tokenized behind the agent's back. The new
ids (tool results, next user turn, the generation prompt) join the trajectory with loss mask 0, the engine's
output with loss mask 1: `tool_loop.Trajectory` does the bookkeeping, so a finished session becomes the same
kind of multi-turn `Sample` as the built-in tool loop's.

What the agent gets back is built to re-render to the generated tokens: plain text exactly as decoded (the
trailing stop token dropped: the template writes it back), and for turns with GLM-4.5 tool calls or a think
block, the parsed `content` / `reasoning_content` / `tool_calls` (finish_reason "tool_calls" when there are
calls); that round trip is exact when the model writes the template's own layout.

Sampling belongs to the run (`--rollout-temperature` etc., handed over as `sampling_params`): a request may
lower `max_tokens`, and a request's `temperature` / `top_p` different from the session's is refused, since the
trainer scores tokens at the rollout temperature. A request past `--max-turns` or `--rollout-max-context-len`
gets an empty answer with finish_reason "length" (the agent stops; the sample ends there).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from glm_rl.rollout.agentic.glm45_format import ParsedTurn, parse_turn
from glm_rl.rollout.agentic.tool_loop import Trajectory
from glm_rl.rollout.generation import RolloutAborted
from glm_rl.rollout.hooks import GenerateFn
from glm_rl.rollout.samples import Sample

_ROLES = ("system", "user", "assistant", "tool")
_STOP_TOKEN = re.compile(r"^<\|[a-z_]+\|>$")


class SessionError(Exception):
    """A request the session refuses: HTTP `status`, OpenAI error `code`, and a message naming the problem."""

    def __init__(self, status: int, message: str, code: str = "invalid_request", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


@dataclass
class Turn:
    """What one chat completion sent and got: the engine's input ids, output ids, logprobs and routing."""

    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float]
    routed_experts: Any  # the engine's rows for every position of this request (None unless asked)
    finish_reason: str
    weight_version: int


@dataclass
class Session:
    id: str
    tokenizer: Any
    generate: GenerateFn  # SGLang /generate body -> answer (`GenerateContext.generate`)
    sampling_params: dict[str, Any] = field(default_factory=dict)
    return_routed_experts: bool = False
    max_turns: int = 1 << 30
    max_context_len: int | None = None
    rid_prefix: str = ""
    parse: Callable[[str], ParsedTurn] = parse_turn
    turns: list[Turn] = field(default_factory=list)
    traj: Trajectory | None = None
    stopped: str | None = None  # "max_turns" / "context" once a request was cut
    aborted: RolloutAborted | None = None  # the rollout aborted a request; re-raised by the caller
    last: ParsedTurn = field(default_factory=lambda: ParsedTurn(None, ""))
    tool_calls: int = 0
    busy: bool = False

    # -- one request -------------------------------------------------------------------------------------------
    async def complete(self, body: Any) -> dict[str, Any]:
        """The chat.completion answer to one request body (see the module docstring)."""
        if self.busy:
            raise SessionError(409, f"session {self.id!r}: a request is already in flight; send turns one at a time")
        self.busy = True
        try:
            return await self._complete(body)
        finally:
            self.busy = False

    async def _complete(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise SessionError(400, f"request body: expected a JSON object, got {type(body).__name__}")
        turn = len(self.turns) + 1
        messages, tools = check_messages(body.get("messages")), check_tools(body.get("tools"))
        params = self._params(body, turn)
        ids = render(self.tokenizer, messages, tools)
        if self.traj is not None:
            self._check_prefix(ids, turn)
        max_ctx = self.max_context_len or (1 << 62)
        budget = min(params["max_new_tokens"], max_ctx - len(ids))
        if turn > self.max_turns or budget < 1:
            self.stopped = self.stopped or ("max_turns" if turn > self.max_turns else "context")
            return chat_completion(self.id, turn, body, "", None, [], "length", len(ids), 0)
        out = await self._generate(ids, dict(params, max_new_tokens=budget), turn)
        # recorded only once the engine answered, so a failed request can be sent again as it was
        if self.traj is None:
            self.traj = Trajectory(list(ids))
        else:
            self.traj.add_observation(ids[len(self.traj.ids) :])
        return self._record(out, turn, body)

    def _params(self, body: dict, turn: int) -> dict[str, Any]:
        unsupported = {  # what the engine cannot honour: refused rather than ignored
            "stream": bool(body.get("stream")),
            "stop": bool(body.get("stop")),
            "n": body.get("n") not in (None, 1),
            "response_format": body.get("response_format") not in (None, {"type": "text"}),
        }
        for key in (k for k, bad in unsupported.items() if bad):
            raise SessionError(400, f"{key}: not supported by the session server (got {body[key]!r})", param=key)
        choice = body.get("tool_choice")
        if choice not in (None, "auto", "none"):
            raise SessionError(400, f"tool_choice: only 'auto' or 'none' are supported (got {choice!r})", "tool_choice")
        params = dict(self.sampling_params)
        params.setdefault("max_new_tokens", 128)
        for key in ("temperature", "top_p"):
            value = body.get(key)
            if value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise SessionError(400, f"{key}: expected a number, got {value!r}", param=key)
            if key in self.sampling_params and float(value) != float(self.sampling_params[key]):
                raise SessionError(
                    400,
                    f"{key}: this session samples at {key} {self.sampling_params[key]} (the run's rollout "
                    f"setting, which the trainer's logprobs assume); got {value}. Leave {key} unset",
                    param=key,
                )
            params[key] = float(value)
        for key in ("max_completion_tokens", "max_tokens"):
            value = body.get(key)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SessionError(400, f"{key}: expected an integer >= 1, got {value!r}", param=key)
            params["max_new_tokens"] = min(params["max_new_tokens"], value)
        if params.get("sampling_seed") is not None:
            params["sampling_seed"] = int(params["sampling_seed"]) + 7919 * (turn - 1)  # tool_loop's per-turn seed
        return params

    def _check_prefix(self, ids: list[int], turn: int) -> None:
        before = self.traj.ids
        if ids[: len(before)] == before and len(ids) > len(before):
            return
        pos = next((i for i, (a, b) in enumerate(zip(before, ids)) if a != b), min(len(before), len(ids)))

        def snippet(seq: list[int]) -> str:
            return repr(self.tokenizer.decode(seq[max(pos - 8, 0) : pos + 8], skip_special_tokens=False))

        raise SessionError(
            400,
            f"session {self.id!r}, turn {turn}: the messages do not extend the session's earlier tokens; first "
            f"difference at token {pos}, {self._where(pos)} (session has {snippet(before)}, the messages render "
            f"{snippet(ids)} around it). Send earlier messages back unchanged (assistant content, "
            "reasoning_content and tool_calls as returned) and append new ones",
            code="session_prefix_mismatch",
            param="messages",
        )

    def _where(self, pos: int) -> str:
        """Which part of the session token `pos` falls in: the first prompt, a turn's output, or what preceded it."""
        end = len(self.turns[0].prompt_ids)
        if pos < end:
            return "inside turn 1's prompt"
        for k, t in enumerate(self.turns, start=1):
            start = len(t.prompt_ids)
            if k > 1 and pos < start:
                return f"inside the messages added before turn {k}"
            if pos < start + len(t.output_ids):
                return f"inside turn {k}'s generated output (an earlier assistant message was changed)"
        return f"past the end of turn {len(self.turns)}'s output (messages were dropped)"

    async def _generate(self, input_ids: list[int], params: dict[str, Any], turn: int) -> dict[str, Any]:
        payload = {
            "input_ids": list(input_ids),
            "sampling_params": params,
            "return_logprob": True,
            "return_routed_experts": self.return_routed_experts,
            "rid": f"{self.rid_prefix or self.id}-t{turn - 1}",
        }
        try:
            out = await self.generate(payload)
        except RolloutAborted as e:  # dynamic sampling's surplus: the caller re-raises it after the agent
            self.aborted = e
            raise SessionError(503, f"session {self.id!r}: the rollout aborted this request", "aborted") from e
        except Exception as e:
            raise SessionError(502, f"session {self.id!r}, turn {turn}: the engine failed: {e}", "engine_error") from e
        if out["meta_info"]["finish_reason"]["type"] == "abort":
            # only the manager's own abort reaches here (SampleGenerator.generate retries others)
            self.aborted = RolloutAborted(f"session {self.id!r}, turn {turn}: the engine aborted the request")
            raise SessionError(503, str(self.aborted), "aborted")
        return out

    def _record(self, out: dict[str, Any], turn: int, body: dict) -> dict[str, Any]:
        meta, output_ids = out["meta_info"], list(out["output_ids"])
        logprobs = [float(lp[0]) for lp in meta.get("output_token_logprobs", [])]
        routed = meta.get("routed_experts") if self.return_routed_experts else None
        prompt = list(self.traj.ids)
        try:
            self.traj.add_turn(output_ids, logprobs, routed)
        except ValueError as e:
            raise SessionError(502, f"session {self.id!r}, turn {turn}: {e}", "engine_error") from e
        finish = meta["finish_reason"]["type"]
        self.turns.append(Turn(prompt, output_ids, logprobs, routed, finish, int(meta.get("weight_version", 0))))
        text = self.tokenizer.decode(_strip_stop(self.tokenizer, output_ids, finish), skip_special_tokens=False)
        parsed = self.parse(text)
        self.last, self.tool_calls = parsed, self.tool_calls + len(parsed.calls)
        structured = bool(parsed.calls) or parsed.thinking is not None
        content = (parsed.content or None) if structured else text
        reason = "tool_calls" if parsed.calls and finish == "stop" else finish
        return chat_completion(
            self.id, turn, body, content, parsed.thinking, parsed.calls, reason, len(prompt), len(output_ids)
        )

    # -- the finished session ----------------------------------------------------------------------------------
    def to_sample(self, template: Sample) -> Sample:
        """The multi-turn Sample: prompt = turn 1's prompt, response = everything after (tool_loop's layout)."""
        if self.traj is None:
            why = (
                f"its first request did not fit (stopped: {self.stopped})"
                if self.stopped
                else "made no chat completion request; the agent must call the model at least once"
            )
            raise SessionError(400, f"session {self.id!r} {why}")
        finish = self.turns[-1].finish_reason if self.stopped is None else "length"
        stopped = self.stopped or ("answer" if finish == "stop" else finish)
        stats = {"turns": len(self.turns), "tool_calls": self.tool_calls, "stopped": stopped, "session": self.id}
        version = min(t.weight_version for t in self.turns)
        return self.traj.to_sample(template, finish, version, self.last.content, stats)


def _strip_stop(tokenizer, ids: list[int], finish: str) -> list[int]:
    """`ids` without the stop token the engine ended on (the template writes its own end of turn)."""
    if finish == "stop" and ids and _STOP_TOKEN.match(tokenizer.convert_ids_to_tokens(ids[-1]) or ""):
        return ids[:-1]
    return ids


# -- request checking and rendering ----------------------------------------------------------------------------
def _text(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise SessionError(
        400, f"{where}.content: expected a string or a list of text parts, got {content!r:.80}", param=where
    )


def _tool_call(tc: Any, where: str) -> dict[str, Any]:
    fn = tc.get("function") if isinstance(tc, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise SessionError(
            400, f"{where}: expected {{'type': 'function', 'function': {{'name', 'arguments'}}}}", param=where
        )
    args = fn.get("arguments") or {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError as e:
            raise SessionError(400, f"{where}.function.arguments: not JSON ({e})", param=where) from e
    if not isinstance(args, dict):
        raise SessionError(400, f"{where}.function.arguments: expected a JSON object, got {args!r:.80}", param=where)
    return {"type": "function", "function": {"name": fn["name"], "arguments": args}}


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """The request's messages in the chat template's shape (tool-call arguments as dicts); 400 naming the field."""
    if not isinstance(messages, list) or not messages:
        got = "nothing" if messages is None else type(messages).__name__
        raise SessionError(400, f"messages: expected a non-empty list of message objects, got {got}", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            role = m.get("role") if isinstance(m, dict) else type(m).__name__
            raise SessionError(400, f"{where}: expected an object with role in {_ROLES}, got {role!r}", param=where)
        msg = {"role": m["role"], "content": _text(m.get("content"), where)}
        if msg["content"] is None and m["role"] != "assistant":
            raise SessionError(400, f"{where}.content: required for role {m['role']!r}", param=where)
        if m["role"] == "assistant":
            if m.get("reasoning_content"):
                msg["reasoning_content"] = str(m["reasoning_content"])
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise SessionError(400, f"{where}.tool_calls: expected a list", param=where)
            if calls:
                msg["tool_calls"] = [_tool_call(tc, f"{where}.tool_calls[{j}]") for j, tc in enumerate(calls)]
        out.append(msg)
    return out


def check_tools(tools: Any) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise SessionError(400, f"tools: expected a list of tool objects, got {tools!r:.80}", param="tools")
    return tools or None


def render(tokenizer, messages: list[dict], tools: list[dict] | None) -> list[int]:
    """Prompt ids of the conversation plus the generation prompt (as `data.prompt_ids` renders prompts)."""
    from glm_rl.rollout.data import prompt_ids

    try:
        return list(prompt_ids(tokenizer, messages, tools=tools))
    except Exception as e:  # jinja errors: a message the template cannot render
        raise SessionError(400, f"messages: the chat template cannot render them ({type(e).__name__}: {e})") from e


def chat_completion(
    session: str,
    turn: int,
    body: dict,
    content: str | None,
    reasoning: str | None,
    calls: list,
    finish: str,
    n_prompt: int,
    n_out: int,
) -> dict[str, Any]:
    """OpenAI's chat.completion object for one turn."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [
            {
                "id": f"call_{turn}_{i}",
                "type": "function",
                "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)},
            }
            for i, c in enumerate(calls)
        ]
    return {
        "id": f"chatcmpl-{session}-{turn}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(body.get("model") or "policy"),
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out},
    }
