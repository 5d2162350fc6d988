"""The built-in tool loop: `--custom-generate-function-path glm_rl.rollout.agentic.tool_loop.generate`.

One episode, token in and token out: turn k sends the trajectory's ids so far to /generate, keeps the exact
`output_ids` the engine returned (loss mask 1, the engine's logprob for each), parses the turn's text for
GLM-4.5 tool calls (`glm45_format.parse_turn`), runs them (`tools.call_tool`; malformed calls and unknown
tools become error observations), and appends the observation turn's ids (rendered alone by the chat
template; loss mask 0, logprob 0.0). Earlier turns are never decoded and re-encoded. The episode ends when a
turn makes no tool call (and has no malformed one), stops on length, `--max-turns` turns have run, or the
next turn would not fit `--rollout-max-context-len` (finish reason "length"; an observation that does not fit
is not appended).

R3: each request returns the routed experts of every position it ran (prompt + output - 1 rows). The sample's
`routed_experts` takes, per position, the rows of the first turn that computed it: turn 1's rows, then for
each later turn the rows past what earlier turns covered (the observation that the turn prefilled and the
tokens it decoded). These are the routings that produced every generated token under a prefix cache, and,
without one (the embedded engine recomputes every prefix), the same routing the trainer's replay needs for
fp32 agreement (tested). The final sequence ends with the last generated token, so every position is covered.

The section `AgenticConfig` comes from `ctx.agentic` when the framework sets it, else the defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from glm_rl.config.agentic import AgenticConfig
from glm_rl.engine import routed_experts
from glm_rl.rollout.agentic.glm45_format import ParsedTurn, observation_ids, parse_turn
from glm_rl.rollout.agentic.sandbox import SandboxLimits
from glm_rl.rollout.agentic.tools import TOOLS, Tool, as_registry, call_tool, load_tools
from glm_rl.rollout.samples import Sample


@dataclass
class Trajectory:
    """The growing episode: prompt, then turns and observations, with per-token mask / logprobs and routing."""

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    routing: list[np.ndarray] = field(default_factory=list)  # row blocks, concatenated = every position so far
    turn_outputs: list[list[int]] = field(default_factory=list)
    observations: list[list[int]] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    def add_turn(self, output_ids: list[int], logprobs: list[float], routed: Any) -> None:
        if len(logprobs) != len(output_ids):
            raise ValueError(f"engine returned {len(output_ids)} ids but {len(logprobs)} logprobs")
        if routed is not None:
            rows = np.asarray(routed, dtype=np.int16)
            covered = sum(len(r) for r in self.routing)
            expected = len(self.ids) + len(output_ids) - 1
            if len(rows) != expected:
                raise ValueError(f"engine returned routing for {len(rows)} positions, expected {expected}")
            self.routing.append(rows[covered:])
        self.response_ids += output_ids
        self.loss_mask += [1] * len(output_ids)
        self.logprobs += logprobs
        self.turn_outputs.append(list(output_ids))

    def add_observation(self, ids: list[int]) -> None:
        self.response_ids += ids
        self.loss_mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.observations.append(list(ids))

    def routed_experts(self) -> np.ndarray | None:
        return np.concatenate(self.routing) if self.routing else None

    def to_sample(self, template: Sample, finish: str, version: int, response_text: str, stats: dict) -> Sample:
        """The multi-turn Sample: prompt = the episode's prompt, response = every turn and observation after it,
        `stats` in `metadata["episode"]` (the tool loop's and the session server's samples alike)."""
        return dataclasses.replace(
            template,
            prompt_ids=list(self.prompt_ids),
            response_ids=self.response_ids,
            rollout_logprobs=self.logprobs,
            loss_mask=self.loss_mask,
            finish_reason=finish,
            weight_version=version,
            routed_experts=self.routed_experts(),
            response_text=response_text,
            metadata={**(template.metadata or {}), "episode": stats},
        )


def tools_for(cfg: AgenticConfig, registry_cache: dict[str, dict[str, Tool]] | None = None) -> dict[str, Tool]:
    """The run's registry (`--tools-path`, default: the built-ins), loaded once per path when given a cache."""
    if cfg.tools_path is None:
        return as_registry(TOOLS, "built-in tools")
    cache = registry_cache if registry_cache is not None else {}
    if cfg.tools_path not in cache:
        cache[cfg.tools_path] = load_tools(cfg.tools_path)
    return cache[cfg.tools_path]


_REGISTRIES: dict[str, dict[str, Tool]] = {}  # per-process cache of imported tool modules (imports are too)


async def generate(ctx, sample: Sample, sampling_params: dict[str, Any]) -> Sample:
    """The hook: one multi-turn episode for `sample` (see the module docstring)."""
    cfg: AgenticConfig = getattr(ctx, "agentic", None) or AgenticConfig()
    return await run_episode(ctx, sample, sampling_params, cfg, tools_for(cfg, _REGISTRIES))


def _turn_payload(
    ctx, traj: Trajectory, sampling_params: dict, sample: Sample, turn: int, max_new: int
) -> dict[str, Any]:
    params = dict(sampling_params, max_new_tokens=max_new)
    if params.get("sampling_seed") is not None:
        params["sampling_seed"] = int(params["sampling_seed"]) + 7919 * turn
    return {
        "input_ids": traj.ids,
        "sampling_params": params,
        "return_logprob": True,
        "return_routed_experts": ctx.return_routed_experts,
        "rid": f"s{ctx.step}-{sample.index}-t{turn}",
    }


async def _observe(parsed: ParsedTurn, tools: dict[str, Tool], limits: SandboxLimits) -> list[str]:
    """One result per call (in order), then one per malformed call."""
    results = [await call_tool(tools, call, limits) for call in parsed.calls]
    return results + [f"error: {e}" for e in parsed.errors]


async def run_episode(
    ctx,
    sample: Sample,
    sampling_params: dict[str, Any],
    cfg: AgenticConfig,
    tools: dict[str, Tool],
    parse: Callable[[str], ParsedTurn] = parse_turn,
) -> Sample:
    """One episode; `parse` reads a turn's text (GLM-4.5's format; tests force calls with their own)."""
    limits = SandboxLimits(cfg.tool_timeout_s, cfg.tool_memory_mb, cfg.tool_max_output_bytes)
    max_ctx = cfg.rollout_max_context_len or (1 << 62)
    max_new = int(sampling_params.get("max_new_tokens", 128))
    traj = Trajectory(list(sample.prompt_ids))
    stats = {"turns": 0, "tool_calls": 0, "tool_errors": 0, "malformed_calls": 0, "stopped": "answer"}
    finish, versions, parsed = "length", [], ParsedTurn(None, "")
    for turn in range(cfg.max_turns):
        budget = min(max_new, max_ctx - len(traj.ids))
        if budget < 1:
            finish, stats["stopped"] = "length", "context"
            break
        out = await ctx.generate(_turn_payload(ctx, traj, sampling_params, sample, turn, budget))
        meta = out["meta_info"]
        output_ids = list(out["output_ids"])
        traj.add_turn(
            output_ids,
            [float(lp[0]) for lp in meta["output_token_logprobs"]],
            routed_experts.decode(meta) if ctx.return_routed_experts else None,  # decoded already via ctx.generate
        )
        finish, stats["turns"] = meta["finish_reason"]["type"], turn + 1
        versions.append(int(meta.get("weight_version", 0)))
        parsed = parse(ctx.tokenizer.decode(output_ids, skip_special_tokens=False))
        stats["tool_calls"] += len(parsed.calls)
        stats["malformed_calls"] += len(parsed.errors)
        if finish != "stop" or not (parsed.calls or parsed.errors):
            stats["stopped"] = "answer" if finish == "stop" else finish
            break
        if turn + 1 == cfg.max_turns:
            stats["stopped"] = "max_turns"
            break
        results = await _observe(parsed, tools, limits)
        stats["tool_errors"] += sum(r.startswith("error:") for r in results)
        obs = observation_ids(ctx.tokenizer, results, output_ids[-1] if output_ids else None)
        if len(traj.ids) + len(obs) >= max_ctx:
            finish, stats["stopped"] = "length", "context"
            break
        traj.add_observation(obs)
    return traj.to_sample(sample, finish, min(versions, default=0), parsed.content, stats)


def tool_schemas(cfg: AgenticConfig) -> list[dict]:
    """What the system turn declares when a prompt row names no tools of its own: the registry's schemas."""
    return [t.schema() for t in tools_for(cfg, _REGISTRIES).values()]
