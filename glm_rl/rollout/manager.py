"""Rollout manager (a Ray actor on CPU): prompts → groups of rewarded samples, and evaluation.

Each step takes prompts from the epoch-shuffled stream (position kept for resume), renders them
(`data.prompt_ids`: the chat template unless --no-apply-chat-template, with the row's tools), and generates
`n_samples_per_prompt` samples per prompt concurrently through the router (SGLang's native API), or through a
`--custom-generate-function-path` hook; each group is then rewarded (`rewards.build_rewarder`: rule, remote or
custom). Without dynamic sampling the step launches `rollout_batch_size` groups and keeps them all; with it
(`dynamic.Collector`) rounds of `over_sampling_batch_size` groups run until `rollout_batch_size` pass the filter,
and the surplus in flight is aborted on the engines (`abort.AbortEngines`). `--rollout-function-path` replaces
the whole step. Prompts over `rollout_max_prompt_len` tokens are skipped and counted, never sent.
`evaluate(step)` runs the eval sets (`evaluation.Evaluator`) on the same engines.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from transformers import AutoTokenizer

from glm_rl.config import AgenticConfig, EvalConfig, RolloutConfig
from glm_rl.rollout import filters
from glm_rl.rollout.data import PromptRow, load_prompts, prompt_ids
from glm_rl.rollout.dynamic import Collector, CollectStats
from glm_rl.rollout.evaluation import Evaluator
from glm_rl.rollout.generation import Counters, GenerateFn, SampleGenerator, SamplingSpec, check_hook_samples
from glm_rl.rollout.groups import generate_group, renumber
from glm_rl.rollout.rewards import build_rewarder
from glm_rl.rollout.rewards.custom import load_function
from glm_rl.rollout.samples import Sample

AbortFn = Callable[[], Awaitable[Any]]  # abort every request in flight on the engines


class PromptStream:
    """Epoch-shuffled prompt order with a resumable position."""

    def __init__(self, rows: list[PromptRow], seed: int, shuffle: bool) -> None:
        self.rows, self.seed, self.shuffle = rows, seed, shuffle
        self.epoch, self.offset = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[PromptRow]:
        out = []
        while len(out) < n:
            if self.offset == len(self._order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self.rows[self._order[self.offset]])
            self.offset += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._order = self._make_order()


class RolloutManager:
    def __init__(
        self,
        cfg: RolloutConfig,
        hf_checkpoint: str,
        generate: GenerateFn,
        *,
        seed: int,
        return_routed_experts: bool,
        eval_cfg: EvalConfig | None = None,
        abort: AbortFn | None = None,
        agentic: AgenticConfig | None = None,
    ):
        self.cfg, self.seed, self.routed, self.abort_fn = cfg, seed, return_routed_experts, abort
        self.tokenizer = AutoTokenizer.from_pretrained(hf_checkpoint)
        self.rewarder = build_rewarder(cfg.rm_type, **cfg.rewarder_args())
        self.stream = PromptStream(load_prompts(cfg.prompt_data, **cfg.data_args()), seed, cfg.rollout_shuffle)
        hook = cfg.custom_generate_function_path
        self.gen = SampleGenerator(
            cfg,
            self.tokenizer,
            generate,
            seed=seed,
            custom_fn=load_function(hook, "--custom-generate-function-path") if hook else None,
            agentic=agentic,
        )
        path = cfg.dynamic_sampling_filter_path
        self.filter = filters.load_filter(path) if path else None
        self.rollout_fn = (
            load_function(cfg.rollout_function_path, "--rollout-function-path") if cfg.rollout_function_path else None
        )
        self.evaluator = Evaluator(eval_cfg, cfg, self.gen, self.rewarder) if eval_cfg and eval_cfg.enabled else None
        self.spec = SamplingSpec(
            temperature=cfg.rollout_temperature,
            top_p=cfg.rollout_top_p,
            top_k=cfg.rollout_top_k,
            max_new_tokens=cfg.rollout_max_response_len,
            routed=return_routed_experts,
            rid_prefix="s",
        )
        self.skipped = 0

    def payload(self, prompt_ids: list[int], step: int, index: int) -> dict[str, Any]:
        """The SGLang /generate body of training sample `index` of `step`."""
        return self.gen.payload(prompt_ids, self.spec, step, index)

    def data_state(self) -> dict[str, int]:
        return self.stream.state_dict()

    def load_data_state(self, state: dict[str, int]) -> None:
        self.stream.load_state_dict(state)

    # -- one rollout step ------------------------------------------------------------------------------------------
    async def generate(self, step: int) -> tuple[list[Sample], dict[str, float]]:
        """One rollout batch (an async method: as a Ray actor it runs on the actor's event loop)."""
        t0 = time.time()
        self.skipped, self.gen.counters = 0, Counters()
        rm_retries = getattr(self.rewarder, "retried", 0)
        if self.rollout_fn is not None:
            samples, stats = await self._custom_rollout(step), None
        else:
            groups, stats = await self._collector(step).collect(self._abort_surplus)
            samples = renumber(groups)
        metrics = self._metrics(samples, stats)
        metrics |= {
            "rollout/rm_retries": float(getattr(self.rewarder, "retried", 0) - rm_retries),
            "perf/rollout_s": time.time() - t0,
        }
        return samples, metrics

    async def evaluate(self, step: int) -> dict[str, float]:
        """The eval sets' metrics at the engines' current weights (empty without --eval-prompt-data)."""
        return await self.evaluator.run(step) if self.evaluator is not None else {}

    def _collector(self, step: int) -> Collector:
        c = self.cfg

        def keep(group: list[Sample]) -> bool:
            return filters.keep_group(self.filter, c.dynamic_sampling_filter_path, c, group)

        def run_group(launch: int, prompt: tuple[PromptRow, list[int]]) -> Awaitable[list[Sample]]:
            return generate_group(
                self.gen, self.rewarder, *prompt, spec=self.spec, step=step, group=launch, n=c.n_samples_per_prompt
            )

        return Collector(
            target=c.rollout_batch_size,
            per_round=c.launch_batch_size,
            next_prompts=self._next_prompts,
            run_group=run_group,
            keep=keep if self.filter is not None else None,
        )

    def _next_prompts(self, k: int) -> list[tuple[PromptRow, list[int]]]:
        """`k` prompts that fit --rollout-max-prompt-len, with their ids; longer ones are skipped and counted."""
        kept = []
        while len(kept) < k:
            for row in self.stream.take(k - len(kept)):
                ids = prompt_ids(
                    self.tokenizer, row.prompt, tools=row.tools, apply_chat_template=self.cfg.apply_chat_template
                )
                if len(ids) > self.cfg.rollout_max_prompt_len:
                    self.skipped += 1
                else:
                    kept.append((row, ids))
        return kept

    async def _abort_surplus(self, tasks: list[asyncio.Task], rounds: int = 20, wait_s: float = 0.5) -> None:
        """End the groups still in flight: abort on the engines (again while requests keep arriving), wait for
        their answers ("abort", or finished meanwhile); without an abort function, cancel them client-side."""
        self.gen.aborting = True
        try:
            for _ in range(rounds if self.abort_fn is not None else 0):
                await self.abort_fn()
                _, pending = await asyncio.wait(tasks, timeout=wait_s)
                tasks = list(pending)
                if not tasks:
                    break
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self.gen.aborting = False

    async def _custom_rollout(self, step: int) -> list[Sample]:
        """--rollout-function-path: the user's function owns batching and rewards; the result must be the step's
        batch (rollout-batch-size x n-samples-per-prompt samples, groups contiguous), renumbered in order."""
        c, path = self.cfg, f"--rollout-function-path {self.cfg.rollout_function_path}"
        try:
            result = await self.rollout_fn(self.gen.context(step, self.routed), step)
        except Exception as e:
            raise RuntimeError(f"{path} raised at step {step}: {e!r}") from e
        samples = check_hook_samples(result, path, f"step {step}", self.routed)
        expected = c.rollout_batch_size * c.n_samples_per_prompt
        if len(samples) != expected:
            raise RuntimeError(
                f"{path} returned {len(samples)} samples at step {step}; expected --rollout-batch-size"
                f" x --n-samples-per-prompt = {expected}, each group's samples contiguous"
            )
        n = c.n_samples_per_prompt
        return renumber([samples[i : i + n] for i in range(0, expected, n)])

    def _metrics(self, samples: list[Sample], stats: CollectStats | None) -> dict[str, float]:
        rewards = np.array([s.reward for s in samples])
        lengths = np.array([len(s.response_ids) for s in samples])
        counters = self.gen.counters
        metrics = {
            "rollout/reward_mean": float(rewards.mean()),
            "rollout/response_len_mean": float(lengths.mean()),
            "rollout/truncated_frac": float(np.mean([s.finish_reason == "length" for s in samples])),
            "rollout/skipped_long_prompts": float(self.skipped),
            "rollout/retried_requests": float(counters.retried),
            "rollout/num_samples": float(len(samples)),
        }
        if stats is not None:
            metrics |= {
                "rollout/generated_groups": float(stats.launched),
                "rollout/sampling_rounds": float(stats.rounds),
                "rollout/filtered_groups": float(stats.filtered),
                "rollout/aborted_groups": float(stats.surplus),
                "rollout/aborted_requests": float(counters.aborted),
            }
        if counters.spec_verify:
            metrics["rollout/spec_accept_length"] = counters.spec_tokens / counters.spec_verify
        return metrics
