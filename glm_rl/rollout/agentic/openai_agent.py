"""Agents written against the `openai` package as rollouts:
`--custom-generate-function-path glm_rl.rollout.agentic.openai_agent.generate --custom-agent-function-path m.fn`.

Per sample, `generate` opens a chat session on this event loop's session server (`session_server`, loopback,
started on first use), hands `fn` an `openai.AsyncOpenAI` client whose base_url is that server and whose
`X-Session-Id` header is the fresh session's id, awaits `fn(client, SampleInfo)`, and turns the session into
one multi-turn Sample (`Session.to_sample`: every chat completion's output ids with loss mask 1, everything
the template added between them with loss mask 0). The agent may call tools, keep its own state, or make no
use of `sample` at all; only what went through the client is trained on.

`fn` may return a string: the text the reward grades (`Sample.response_text`); otherwise the last turn's
visible content is graded. An agent that raises fails the sample (the framework's HookError names it), except
when the rollout aborted one of its requests (dynamic sampling): then that abort propagates, as the hook
contract asks.
"""

from __future__ import annotations

import dataclasses
import inspect
import uuid
from dataclasses import dataclass
from typing import Any

from glm_rl.config.agentic import AgenticConfig
from glm_rl.rollout.agentic.session import Session
from glm_rl.rollout.agentic.session_server import MODEL_NAME, SESSION_HEADER, SessionServer, shared_server
from glm_rl.rollout.rewards.custom import load_function
from glm_rl.rollout.samples import Sample

FLAG = "--custom-agent-function-path"


@dataclass(frozen=True)
class SampleInfo:
    """What an agent function knows about its sample (the prompt row and the run's sampling)."""

    index: int
    group: int
    session_id: str
    model: str  # pass as `model=` (any name is accepted)
    prompt_text: str  # the row's prompt as the plain rollout renders it (chat template applied)
    messages: list[dict] | None  # the row's chat messages when known: metadata["messages"], or metadata["prompt"]
    label: str | None
    metadata: dict
    tools: list | None  # the row's tool schemas (OpenAI shape), for `tools=`
    sampling_params: dict  # the session samples with these; requests may only lower max_tokens


def _messages(metadata: dict) -> list[dict] | None:
    if isinstance(metadata.get("messages"), list):
        return list(metadata["messages"])
    if isinstance(metadata.get("prompt"), str):
        return [{"role": "user", "content": metadata["prompt"]}]
    return None


def sample_info(ctx, sample: Sample, session: Session) -> SampleInfo:
    metadata = dict(sample.metadata or {})
    return SampleInfo(
        index=sample.index,
        group=sample.group,
        session_id=session.id,
        model=MODEL_NAME,
        prompt_text=ctx.tokenizer.decode(sample.prompt_ids, skip_special_tokens=False),
        messages=_messages(metadata),
        label=sample.label,
        metadata=metadata,
        tools=sample.tools,
        sampling_params=dict(session.sampling_params),
    )


def client_for(server: SessionServer, session_id: str, timeout_s: float = 3600.0):
    """An AsyncOpenAI client bound to one session (no retries: a retried turn would fail the prefix check)."""
    import openai

    return openai.AsyncOpenAI(
        base_url=server.url + "/v1",
        api_key="glm-rl-session",  # the server is loopback-only and checks session ids, not keys
        default_headers={SESSION_HEADER: session_id},
        max_retries=0,
        timeout=timeout_s,
        http_client=openai.DefaultAsyncHttpxClient(trust_env=False),  # never through an HTTP(S)_PROXY
    )


async def run_agent(fn, ctx, sample: Sample, sampling_params: dict[str, Any], cfg: AgenticConfig) -> Sample:
    """One agent episode on a fresh session; the session's Sample."""
    server = await shared_server()
    session = server.open(
        f"s{ctx.step}-{sample.index}-{uuid.uuid4().hex[:8]}",
        tokenizer=ctx.tokenizer,
        generate=ctx.generate,
        sampling_params=dict(sampling_params),
        return_routed_experts=ctx.return_routed_experts,
        max_turns=cfg.max_turns,
        max_context_len=cfg.rollout_max_context_len,
        rid_prefix=f"s{ctx.step}-{sample.index}",
    )
    try:
        async with client_for(server, session.id) as client:
            try:
                result = fn(client, sample_info(ctx, sample, session))
                result = await result if inspect.isawaitable(result) else result
            except Exception:
                if session.aborted is not None:
                    raise session.aborted from None
                raise
    finally:
        server.close(session.id)
    if session.aborted is not None:  # the agent swallowed the abort: the group is discarded anyway
        raise session.aborted
    out = session.to_sample(sample)
    if isinstance(result, str):
        out = dataclasses.replace(out, response_text=result)
    return out


_AGENTS: dict[str, Any] = {}


async def generate(ctx, sample: Sample, sampling_params: dict[str, Any]) -> Sample:
    """The hook (see the module docstring)."""
    cfg: AgenticConfig = getattr(ctx, "agentic", None) or AgenticConfig()
    path = cfg.custom_agent_function_path
    if not path:
        raise ValueError(f"glm_rl.rollout.agentic.openai_agent.generate needs {FLAG} module.fn (the agent to run)")
    if path not in _AGENTS:
        _AGENTS[path] = load_function(path, FLAG)
    return await run_agent(_AGENTS[path], ctx, sample, sampling_params, cfg)
