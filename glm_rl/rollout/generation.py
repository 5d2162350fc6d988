"""One sample's generation: the SGLang /generate request (retried), or the user's custom generate function.

`SampleGenerator` is what the rollout manager calls per sample and what a `--custom-generate-function-path` hook
reaches the engines through (`GenerateContext.generate` is `SampleGenerator.generate`):
- requests are seeded by (run seed, step, sample index), so a re-issued or resumed request samples the same;
- a request whose engine failed or answered "abort" (a pause during an engine restart) is re-issued, except
  while the manager aborts its own surplus requests (dynamic sampling): then an "abort" answer is returned as
  is, a request not yet sent raises `RolloutAborted`, and each is counted in `counters.aborted`;
- with `partial_rollout` (--partial-rollout), a request cut by a weight update ("abort" with tokens) continues
  from its prefix under the new weights (partial.py), counted in `counters.continued`;
- routed experts (R3) are decoded once, on arrival, into a (positions, MoE layers, top_k) int16 array, whichever
  wire form the engine used (engine/routed_experts.py), so hooks and partial rollouts see arrays;
- a hook's result is checked (a Sample or a non-empty list of them, one logprob per response token, a loss
  mask as long, routed experts when R3 needs them) and every failure names the function and the sample.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from glm_rl.config import AgenticConfig, RolloutConfig
from glm_rl.engine import routed_experts
from glm_rl.engine.routed_experts import RoutingLayout
from glm_rl.rollout import partial
from glm_rl.rollout.hooks import GenerateContext
from glm_rl.rollout.samples import Sample

GenerateFn = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
HOOK_FLAG = "--custom-generate-function-path"


class RolloutAborted(RuntimeError):
    """A request the manager no longer wants (surplus of dynamic sampling): never sent."""


class RequestFailed(RuntimeError):
    """A request that failed on every attempt (its engines died or kept failing): worth running again later."""


class HookError(RuntimeError):
    """A custom generate / rollout function that raised or returned something unusable; names it and the sample."""


@dataclass(frozen=True)
class SamplingSpec:
    """How the samples of one kind of request are drawn: training rollouts, or one eval set."""

    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    routed: bool  # ask for routed experts (R3 training only)
    rid_prefix: str  # "s" for training ("s3-17"), "e<step>-<set>-" style for eval
    seed_offset: int = 0  # keeps eval seeds apart from training seeds


@dataclass
class Counters:
    retried: int = 0  # requests re-issued after an engine failure
    aborted: int = 0  # surplus requests aborted (dynamic sampling)
    spec_tokens: int = 0  # MTP: completion tokens ...
    spec_verify: int = 0  # ... and verify forwards
    continued: int = 0  # partial rollouts continued after a weight update
    latency_max: float = 0.0  # the longest an answer spent inside an engine (meta_info e2e_latency), s
    batch_seconds: float = 0.0  # engine-seconds of decoding: each answer adds its batch's time / rows
    batch_tokens: int = 0  # completion tokens of the answers that reported their batch


class SampleGenerator:
    def __init__(
        self,
        cfg: RolloutConfig,
        tokenizer: Any,
        generate: GenerateFn,
        *,
        seed: int,
        custom_fn: Callable[..., Awaitable[Any]] | None = None,
        agentic: AgenticConfig | None = None,
        partial_rollout: bool = False,
        routing_layout: RoutingLayout | None = None,
    ) -> None:
        self.cfg, self.tokenizer, self.generate_fn, self.seed = cfg, tokenizer, generate, seed
        self.partial_rollout, self.routing_layout = partial_rollout, routing_layout
        self.agentic = agentic
        self.custom_fn = custom_fn
        self.counters = Counters()
        self.aborting = False

    # -- requests ----------------------------------------------------------------------------------------------
    def sampling_params(self, spec: SamplingSpec, step: int, index: int) -> dict[str, Any]:
        return {
            "temperature": spec.temperature,
            "top_p": spec.top_p,
            "top_k": spec.top_k,
            "max_new_tokens": spec.max_new_tokens,
            "sampling_seed": self.seed * 1_000_003 + spec.seed_offset + step * 10_007 + index,
        }

    def rid(self, spec: SamplingSpec, step: int, index: int) -> str:
        return f"{spec.rid_prefix}{step}-{index}"

    def payload(self, prompt_ids: list[int], spec: SamplingSpec, step: int, index: int) -> dict[str, Any]:
        """The SGLang /generate body of one sample."""
        return {
            "input_ids": prompt_ids,
            "sampling_params": self.sampling_params(spec, step, index),
            "return_logprob": True,
            "return_routed_experts": spec.routed,
            "rid": self.rid(spec, step, index),
        }

    async def generate(self, payload: dict[str, Any], attempts: int = 6) -> dict[str, Any]:
        """One /generate answer, re-issued on failure (the same rid and seed give the same sample); with
        partial rollouts, continued after each weight update that cut it (partial.py)."""
        if not self.partial_rollout:
            return await self._request(payload, attempts)
        segments: list[dict[str, Any]] = []
        while True:
            body = partial.continuation(payload, segments)
            if body is None:  # cut exactly as its budget ran out
                return partial.merge(segments, finish_if_spent=True)
            out = await self._request(body, attempts, keep_partial=True)
            segments.append(out)
            if out["meta_info"]["finish_reason"]["type"] != "abort" or self.aborting:
                return partial.merge(segments)
            self.counters.continued += 1

    async def _request(self, payload: dict[str, Any], attempts: int, keep_partial: bool = False) -> dict[str, Any]:
        """One answer; `keep_partial`: an "abort" answer that carries tokens is returned (to be continued)."""
        error: Exception | None = None
        for attempt in range(attempts):
            if self.aborting:
                self.counters.aborted += 1
                raise RolloutAborted(f"request {payload.get('rid')} aborted (surplus of dynamic sampling)")
            try:
                out = await self.generate_fn(payload)
                if "routed_experts" in out["meta_info"]:  # one base64 buffer → (positions, MoE layers, top_k)
                    out["meta_info"]["routed_experts"] = routed_experts.decode(out["meta_info"], self.routing_layout)
            except asyncio.CancelledError:
                self.counters.aborted += int(self.aborting)
                raise
            except Exception as e:  # connection refused / reset, HTTP 5xx from a dying engine
                if self.aborting:  # our own abort cut it: not worth a retry
                    self.counters.aborted += 1
                    raise RolloutAborted(f"request {payload.get('rid')} aborted (surplus of dynamic sampling)") from e
                error = e
            else:
                if out["meta_info"]["finish_reason"]["type"] != "abort":
                    return out
                if self.aborting:
                    self.counters.aborted += 1
                    return out
                if keep_partial and out["output_ids"]:
                    return out
                error = RuntimeError(f"request {payload.get('rid')} aborted")
            self.counters.retried += 1
            await asyncio.sleep(min(0.2 * 2**attempt, 5.0))
        raise RequestFailed(f"request {payload.get('rid')} failed {attempts} times; last error: {error}")

    def context(self, step: int, routed: bool) -> GenerateContext:
        return GenerateContext(
            rollout=self.cfg,
            tokenizer=self.tokenizer,
            generate=self.generate,
            return_routed_experts=routed,
            step=step,
            seed=self.seed,
            agentic=self.agentic,
        )

    # -- samples -----------------------------------------------------------------------------------------------
    async def sample(self, template: Sample, spec: SamplingSpec, step: int) -> list[Sample]:
        """The sample(s) for `template` (prompt, label, metadata, tools set; no response yet)."""
        if self.custom_fn is not None:
            return await self._custom(template, spec, step)
        out = await self.generate(self.payload(template.prompt_ids, spec, step, template.index))
        return [self.from_answer(template, out, spec.routed)]

    def from_answer(self, template: Sample, out: dict[str, Any], routed: bool) -> Sample:
        meta = out["meta_info"]
        if "spec_verify_ct" in meta:  # MTP speculative decoding: tokens per verify forward
            self.counters.spec_tokens += int(meta["completion_tokens"])
            self.counters.spec_verify += int(meta["spec_verify_ct"])
        if "e2e_latency" in meta:  # SGLang reports it too
            self.counters.latency_max = max(self.counters.latency_max, float(meta["e2e_latency"]))
        if meta.get("decode_batch_rows"):  # the embedded engine: the batch that decoded this answer
            self.counters.batch_seconds += float(meta["decode_batch_s"]) / int(meta["decode_batch_rows"])
            self.counters.batch_tokens += int(meta["completion_tokens"])
        experts = np.asarray(meta["routed_experts"], dtype=np.int16) if routed else None
        return dataclasses.replace(
            template,
            response_ids=list(out["output_ids"]),
            rollout_logprobs=[float(lp[0]) for lp in meta.get("output_token_logprobs", [])],
            finish_reason=meta["finish_reason"]["type"],
            weight_version=int(meta.get("weight_version", 0)),
            token_versions=list(meta["weight_versions"]) if "weight_versions" in meta else None,
            routed_experts=experts,
        )

    async def _custom(self, template: Sample, spec: SamplingSpec, step: int) -> list[Sample]:
        path, rid = self.cfg.custom_generate_function_path, self.rid(spec, step, template.index)
        params = self.sampling_params(spec, step, template.index)
        try:
            result = await self.custom_fn(self.context(step, spec.routed), dataclasses.replace(template), params)
        except (RolloutAborted, asyncio.CancelledError):
            raise
        except Exception as e:
            raise HookError(f"{HOOK_FLAG} {path} raised on sample {rid}: {e!r}") from e
        return check_hook_samples(result, f"{HOOK_FLAG} {path}", f"sample {rid}", spec.routed)


def check_hook_samples(result: Any, who: str, what: str, routed: bool) -> list[Sample]:
    """`result` (a Sample or a list of them) as a list, each checked; HookError naming `who` and `what`."""
    items = result if isinstance(result, list) else [result]
    if not items or not all(isinstance(s, Sample) for s in items):
        got = (
            f"a list of {[type(s).__name__ for s in items][:4]}" if isinstance(result, list) else type(result).__name__
        )
        raise HookError(f"{who} returned {got} for {what}; expected a Sample or a non-empty list of Samples")
    for s in items:
        n = len(s.response_ids)
        if len(s.rollout_logprobs) != n:
            raise HookError(f"{who}, {what}: {len(s.rollout_logprobs)} rollout_logprobs for {n} response tokens")
        if s.loss_mask is not None and len(s.loss_mask) != n:
            raise HookError(f"{who}, {what}: loss_mask has {len(s.loss_mask)} entries for {n} response tokens")
        if routed and s.routed_experts is None:
            raise HookError(
                f"{who}, {what}: routed_experts is None, but R3 replays the engine's routing (ask "
                "with ctx.return_routed_experts and keep meta_info['routed_experts'])"
            )
    return items
