"""Extension points of a rollout step (slime's names), and what the framework hands them.

- `--custom-generate-function-path module.fn`: `async def fn(ctx: GenerateContext, sample: Sample,
  sampling_params: dict) -> Sample | list[Sample]`, called once per sample instead of the single /generate
  call. `sample` arrives with `index`, `group`, `prompt_ids`, `label`, `metadata`, `tools` set; the function
  fills `response_ids`, `rollout_logprobs` (one per response token), `finish_reason`, `weight_version`,
  `routed_experts` (R3: every position of the final sequence), and for multi-turn episodes `loss_mask` (0 on
  appended observation tokens) and optionally `response_text` (what the reward grades). The reward is then
  computed by the framework.
- `--rollout-function-path module.fn`: `async def fn(ctx: GenerateContext, step: int) -> list[Sample]`
  replaces the whole rollout step (the user owns batching and rewards).

Functions reach engines only through `ctx.generate` (SGLang /generate body → answer; the router, or the R3
path the run needs), never through raw URLs.

What the framework does around them (glm_rl/rollout/generation.py, groups.py, manager.py):
- `sampling_params` carries temperature, top_p, top_k, max_new_tokens and a `sampling_seed` derived from (run
  seed, step, sample index); rids of the plain path are "s<step>-<index>".
- A returned list joins the sample's group; a group must keep `--n-samples-per-prompt` samples in all
  (advantages are per group). Errors (a raise, a wrong type, logprobs or loss mask of the wrong length, missing
  routed experts under R3) name the function and the sample.
- Dynamic sampling: once enough groups passed the filter, the surplus still in flight is aborted. `ctx.generate`
  then returns the engine's answer with finish_reason "abort", or raises `generation.RolloutAborted` for a request
  not yet sent; either way the group is discarded, so a function may let it propagate.
- Eval (`--eval-prompt-data`) calls the same function with the eval sampling params and
  `ctx.return_routed_experts` False.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from glm_rl.config import AgenticConfig, RolloutConfig

GenerateFn = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class GenerateContext:
    rollout: RolloutConfig
    tokenizer: Any  # the checkpoint's HF tokenizer (chat template included)
    generate: GenerateFn  # one SGLang /generate request through the run's endpoints (retried)
    return_routed_experts: bool  # R3: requests must ask for routed experts, samples must carry them
    step: int
    seed: int
    agentic: AgenticConfig | None = None  # the built-in tool loop's section (`--max-turns`, `--tools-path`, ...)
