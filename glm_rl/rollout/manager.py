"""Rollout manager (a Ray actor on CPU): prompts → groups of samples with rewards.

Each step takes the next `rollout_batch_size` prompts (epoch-shuffled, position kept for resume), sends
`n_samples_per_prompt` concurrent /generate requests per prompt through the router (SGLang's native API),
and turns the answers into `Sample`s with rewards. Prompts over `rollout_max_prompt_len` tokens are skipped
and counted (`rollout/skipped_long_prompts`), never sent.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, Awaitable, Callable

import numpy as np
from transformers import AutoTokenizer

from glm_rl.config import RolloutConfig
from glm_rl.rollout.data import PromptRow, load_prompts
from glm_rl.rollout.data import prompt_ids as chat_prompt_ids  # text or chat messages, through the chat template
from glm_rl.rollout.rewards import get_reward_fn
from glm_rl.rollout.samples import Sample

GenerateFn = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


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
    def __init__(self, cfg: RolloutConfig, hf_checkpoint: str, generate: GenerateFn, *, seed: int,
                 return_routed_experts: bool) -> None:
        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(hf_checkpoint)
        self.reward_fn = get_reward_fn(cfg.rm_type)
        self.stream = PromptStream(load_prompts(cfg.prompt_data), seed, cfg.rollout_shuffle)
        self.generate_fn = generate
        self.seed = seed
        self.routed = return_routed_experts
        self.retried = 0
        self.spec_counts = [0, 0]  # completion tokens, verify forwards (this step)

    def _prompt_ids(self, batch: list[PromptRow]) -> tuple[list[tuple[PromptRow, list[int]]], int]:
        kept, skipped = [], 0
        while len(kept) < self.cfg.rollout_batch_size:
            for row in batch:
                ids = chat_prompt_ids(self.tokenizer, row.prompt)
                if len(ids) > self.cfg.rollout_max_prompt_len:
                    skipped += 1
                else:
                    kept.append((row, ids))
            batch = self.stream.take(self.cfg.rollout_batch_size - len(kept))
        return kept, skipped

    def data_state(self) -> dict[str, int]:
        return self.stream.state_dict()

    def load_data_state(self, state: dict[str, int]) -> None:
        self.stream.load_state_dict(state)

    async def generate(self, step: int) -> tuple[list[Sample], dict[str, float]]:
        """One rollout batch (an async method: as a Ray actor it runs on the actor's event loop)."""
        t0 = time.time()
        prompts, skipped = self._prompt_ids(self.stream.take(self.cfg.rollout_batch_size))
        self.retried, self.spec_counts = 0, [0, 0]
        samples = await self._generate_all(prompts, step)
        rewards = np.array([s.reward for s in samples])
        lengths = np.array([len(s.response_ids) for s in samples])
        metrics = {"rollout/reward_mean": float(rewards.mean()), "rollout/response_len_mean": float(lengths.mean()),
                   "rollout/truncated_frac": float(np.mean([s.finish_reason == "length" for s in samples])),
                   "rollout/skipped_long_prompts": float(skipped), "rollout/retried_requests": float(self.retried), "rollout/num_samples": float(len(samples)),
                   "perf/rollout_s": time.time() - t0}
        if self.spec_counts[1]:
            metrics["rollout/spec_accept_length"] = self.spec_counts[0] / self.spec_counts[1]
        return samples, metrics

    async def _generate_all(self, prompts, step: int) -> list[Sample]:
        n = self.cfg.n_samples_per_prompt
        jobs = [self._one(group, row, ids, group * n + k, step) for group, (row, ids) in enumerate(prompts)
                for k in range(n)]
        return list(await asyncio.gather(*jobs))

    async def _generate_with_retry(self, payload: dict[str, Any], attempts: int = 6) -> dict[str, Any]:
        """Re-issue a request whose engine failed (the router usually retries first); the same rid and
        sampling seed give the same sample, so nothing is lost or duplicated."""
        for attempt in range(attempts):
            try:
                out = await self.generate_fn(payload)
                if out["meta_info"]["finish_reason"]["type"] != "abort":
                    return out
                error: Exception = RuntimeError(f"request {payload['rid']} aborted")
            except Exception as e:  # connection refused / reset, HTTP 5xx from a dying engine
                error = e
            self.retried += 1
            await asyncio.sleep(min(0.2 * 2 ** attempt, 5.0))
        raise RuntimeError(f"request {payload['rid']} failed {attempts} times; last error: {error}")

    def payload(self, prompt_ids: list[int], step: int, index: int) -> dict[str, Any]:
        """The SGLang /generate body of one sample; the seed derives from (seed, step, sample) so a re-issued
        or resumed request gives the same sample."""
        c = self.cfg
        return {
            "input_ids": prompt_ids,
            "sampling_params": {"temperature": c.rollout_temperature, "top_p": c.rollout_top_p,
                                "top_k": c.rollout_top_k, "max_new_tokens": c.rollout_max_response_len,
                                "sampling_seed": self.seed * 1_000_003 + step * 10_007 + index},
            "return_logprob": True,
            "return_routed_experts": self.routed,
            "rid": f"s{step}-{index}",
        }

    async def _one(self, group: int, row: PromptRow, prompt_ids: list[int], index: int, step: int) -> Sample:
        payload = self.payload(prompt_ids, step, index)
        out = await self._generate_with_retry(payload)
        meta = out["meta_info"]
        response = list(out["output_ids"])
        logprobs = [float(lp[0]) for lp in meta["output_token_logprobs"]]
        if "spec_verify_ct" in meta:  # MTP speculative decoding: tokens per verify forward
            self.spec_counts[0] += int(meta["completion_tokens"])
            self.spec_counts[1] += int(meta["spec_verify_ct"])
        routed = np.asarray(meta["routed_experts"], dtype=np.int16) if self.routed else None
        text = self.tokenizer.decode(response, skip_special_tokens=True)
        return Sample(index=index, group=group, prompt_ids=prompt_ids, response_ids=response,
                      rollout_logprobs=logprobs, reward=self.reward_fn(text, row.label),
                      finish_reason=meta["finish_reason"]["type"], weight_version=int(meta.get("weight_version", 0)),
                      routed_experts=routed)
