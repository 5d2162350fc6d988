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
import dataclasses
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from transformers import AutoConfig, AutoTokenizer

from glm_rl.config import AgenticConfig, AsyncConfig, EvalConfig, RolloutConfig
from glm_rl.engine.routed_experts import RoutingLayout
from glm_rl.rollout import filters
from glm_rl.rollout.async_buffer import AsyncProducer
from glm_rl.rollout.data import PromptRow, load_prompts, prompt_ids
from glm_rl.rollout.dynamic import Collector, CollectStats
from glm_rl.rollout.evaluation import Evaluator
from glm_rl.rollout.generation import Counters, GenerateFn, SampleGenerator, SamplingSpec, check_hook_samples
from glm_rl.rollout.groups import generate_group, renumber
from glm_rl.rollout.rewards import build_rewarder
from glm_rl.rollout.rewards.custom import load_function
from glm_rl.rollout.samples import Sample

OPENAI_AGENT_HOOK = "glm_rl.rollout.agentic.openai_agent.generate"  # --custom-agent-function-path runs it
AbortFn = Callable[[], Awaitable[Any]]  # abort every request in flight on the engines


class PromptStream:
    """Epoch-shuffled prompt order with a resumable position. Prompts given back (`give_back`: generated but not
    trained, e.g. in flight at a save or dropped as too stale) are taken again first, and saved with the state."""

    def __init__(self, rows: list[PromptRow], seed: int, shuffle: bool) -> None:
        self.rows, self.seed, self.shuffle = rows, seed, shuffle
        self.epoch, self.offset = 0, 0
        self.replay: deque[int] = deque()  # row indices to take before the next new one
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def take_indexed(self, n: int) -> list[tuple[int, PromptRow]]:
        """The next `n` prompts with their row indices."""
        out = []
        while len(out) < n:
            if self.replay:
                i = self.replay.popleft()
            else:
                if self.offset == len(self._order):
                    self.epoch, self.offset = self.epoch + 1, 0
                    self._order = self._make_order()
                i = self._order[self.offset]
                self.offset += 1
            out.append((i, self.rows[i]))
        return out

    def take(self, n: int) -> list[PromptRow]:
        return [row for _, row in self.take_indexed(n)]

    def give_back(self, index: int) -> None:
        self.replay.append(index)

    def state_dict(self, untrained: list[int] = ()) -> dict:
        """The position; `untrained`: row indices taken but not trained, to be taken first after a resume."""
        return {"epoch": self.epoch, "offset": self.offset, "replay": [*untrained, *self.replay]}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]
        self.replay = deque(int(i) for i in state.get("replay", ()))
        self._order = self._make_order()


def _episode_metrics(samples: list[Sample]) -> dict[str, float]:
    """Tool-loop episodes (`metadata["episode"]`): how often the model called a tool, well-formed, and how many
    turns it took (whether a call was *correct* is the task's business: the reward)."""
    episodes = [s.metadata["episode"] for s in samples if s.metadata and "episode" in s.metadata]
    if not episodes:
        return {}
    called = [e.get("tool_calls", 0) > 0 for e in episodes]
    return {
        "rollout/tool_call_frac": float(np.mean(called)),
        "rollout/wellformed_call_frac": float(
            np.mean(
                [
                    c and e.get("malformed_calls", 0) == 0 and e.get("tool_errors", 0) == 0
                    for c, e in zip(called, episodes)
                ]
            )
        ),
        "rollout/malformed_call_frac": float(np.mean([e.get("malformed_calls", 0) > 0 for e in episodes])),
        "rollout/turns_mean": float(np.mean([e.get("turns", 1) for e in episodes])),
    }


def _routing_layout(hf_checkpoint: str) -> RoutingLayout:
    """The checkpoint's MoE layers and top-k: what decoding SGLang's form of routed experts needs."""
    return RoutingLayout.of(AutoConfig.from_pretrained(hf_checkpoint))


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
        asynchrony: AsyncConfig | None = None,
    ):
        self.cfg, self.seed, self.routed, self.abort_fn = cfg, seed, return_routed_experts, abort
        self.asynchrony = asynchrony or AsyncConfig()
        self.tokenizer = AutoTokenizer.from_pretrained(hf_checkpoint)
        self.rewarder = build_rewarder(cfg.rm_type, **cfg.rewarder_args())
        self.stream = PromptStream(load_prompts(cfg.prompt_data, **cfg.data_args()), seed, cfg.rollout_shuffle)
        hook = cfg.custom_generate_function_path
        if hook is None and agentic is not None and agentic.custom_agent_function_path:  # the agent's own hook
            hook = OPENAI_AGENT_HOOK
        self.gen = SampleGenerator(
            cfg,
            self.tokenizer,
            generate,
            seed=seed,
            custom_fn=load_function(hook, "--custom-generate-function-path") if hook else None,
            agentic=agentic,
            partial_rollout=self.asynchrony.partial_rollout,
            routing_layout=_routing_layout(hf_checkpoint) if return_routed_experts else None,
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
        self.producer: AsyncProducer | None = None  # --fully-async: started by the first take_batch

    def payload(self, prompt_ids: list[int], step: int, index: int) -> dict[str, Any]:
        """The SGLang /generate body of training sample `index` of `step`."""
        return self.gen.payload(prompt_ids, self.spec, step, index)

    def data_state(self) -> dict:
        """The prompt position; with --fully-async, prompts in flight or buffered are listed to be replayed."""
        return self.stream.state_dict(self.producer.untrained() if self.producer is not None else [])

    def load_data_state(self, state: dict) -> None:
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
        if "rollout/engine_latency_max_s" in metrics:  # requests, router, HTTP, rewards: what engines do not take
            metrics["perf/rollout_outside_engines_s"] = (
                metrics["perf/rollout_s"] - metrics["rollout/engine_latency_max_s"]
            )
        return samples, metrics

    async def take_batch(self, trainer_version: int, timeout_s: float = 5.0) -> tuple[list[Sample], dict] | None:
        """--fully-async: the next batch from the buffer the engines fill continuously (async_buffer.py), fresh
        enough for `trainer_version`; None when not ready within `timeout_s`."""
        if self.producer is None:
            self.producer = self._producer()
        self.skipped = 0
        got = await self.producer.take(trainer_version, timeout_s)
        if got is None:
            return None
        groups, stats = got
        samples = renumber(groups)
        counters, self.gen.counters = self.gen.counters, Counters()
        metrics = self._metrics(samples, None, counters) | {
            "rollout/generated_groups": float(stats.launched),
            "rollout/filtered_groups": float(stats.filtered),
            "rollout/stale_dropped": float(stats.stale_dropped),
            "rollout/failed_groups": float(stats.failed),
            "async/trainer_wait_s": stats.trainer_wait_s,
            "async/engine_idle_s": stats.engine_idle_s,
            "perf/rollout_s": stats.trainer_wait_s,
        }
        return samples, metrics

    async def stop_producer(self) -> None:
        if self.producer is not None:
            await self.producer.stop()

    def _producer(self) -> AsyncProducer:
        c, spec = self.cfg, dataclasses.replace(self.spec, rid_prefix="a")

        def run_group(launch: int, prompt: tuple[PromptRow, list[int]]) -> Awaitable[list[Sample]]:
            return generate_group(
                self.gen, self.rewarder, *prompt, spec=spec, step=launch, group=0, n=c.n_samples_per_prompt
            )

        return AsyncProducer(
            batch_groups=c.rollout_batch_size,
            max_staleness=self.asynchrony.max_weight_staleness,
            next_prompt=lambda: self._next_indexed_prompts(1)[0],
            give_back=self.stream.give_back,
            run_group=run_group,
            keep=self._keep if self.filter is not None else None,
        )

    async def evaluate(self, step: int) -> dict[str, float]:
        """The eval sets' metrics at the engines' current weights (empty without --eval-prompt-data)."""
        return await self.evaluator.run(step) if self.evaluator is not None else {}

    def _collector(self, step: int) -> Collector:
        c = self.cfg

        def run_group(launch: int, prompt: tuple[PromptRow, list[int]]) -> Awaitable[list[Sample]]:
            return generate_group(
                self.gen, self.rewarder, *prompt, spec=self.spec, step=step, group=launch, n=c.n_samples_per_prompt
            )

        return Collector(
            target=c.rollout_batch_size,
            per_round=c.launch_batch_size,
            next_prompts=self._next_prompts,
            run_group=run_group,
            keep=self._keep if self.filter is not None else None,
        )

    def _keep(self, group: list[Sample]) -> bool:
        """The dynamic-sampling filter's verdict on a finished group."""
        return filters.keep_group(self.filter, self.cfg.dynamic_sampling_filter_path, self.cfg, group)

    def _next_prompts(self, k: int) -> list[tuple[PromptRow, list[int]]]:
        return [prompt for _, prompt in self._next_indexed_prompts(k)]

    def _next_indexed_prompts(self, k: int) -> list[tuple[int, tuple[PromptRow, list[int]]]]:
        """`k` prompts that fit --rollout-max-prompt-len, with their row indices and ids; longer ones are skipped
        and counted."""
        kept = []
        while len(kept) < k:
            for index, row in self.stream.take_indexed(k - len(kept)):
                ids = prompt_ids(
                    self.tokenizer, row.prompt, tools=row.tools, apply_chat_template=self.cfg.apply_chat_template
                )
                if len(ids) > self.cfg.rollout_max_prompt_len:
                    self.skipped += 1
                else:
                    kept.append((index, (row, ids)))
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

    def _metrics(
        self, samples: list[Sample], stats: CollectStats | None, counters: Counters | None = None
    ) -> dict[str, float]:
        rewards = np.array([s.reward for s in samples])
        lengths = np.array([len(s.response_ids) for s in samples])
        counters = counters or self.gen.counters
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
        if self.asynchrony.partial_rollout:
            metrics["rollout/partial_continued"] = float(counters.continued)
        if counters.latency_max:
            metrics["rollout/engine_latency_max_s"] = counters.latency_max
        if counters.batch_seconds:  # an engine's decode rate inside the loop (engine-seconds: engines add up)
            metrics["rollout/engine_decode_tok_s"] = counters.batch_tokens / counters.batch_seconds
        metrics |= _episode_metrics(samples)
        if counters.spec_verify:
            metrics["rollout/spec_accept_length"] = counters.spec_tokens / counters.spec_verify
        return metrics
