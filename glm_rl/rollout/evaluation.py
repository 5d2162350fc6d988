"""Evaluation during training: each eval set through the rollout engines at the current weights.

Every prompt of a set gets `--n-samples-per-eval-prompt` samples (eval sampling: temperature, top-p, max
response length, reward; each defaults to the rollout's), through the same path as training samples (a custom
generate function too), without routed experts. A sample passes when its reward is positive (1 for the 0/1
graders, +1 for dapo). Metrics per set, `eval/<name>/...`:
- `reward_mean`, `response_len_mean` over every sample;
- `pass@1` and `pass@<n>` (n samples per prompt): the unbiased estimator of Chen et al. 2021 (Codex, eq. 1),
  1 - C(n - c, k) / C(n, k) for c passing samples of n, averaged over prompts.
"""

from __future__ import annotations

import asyncio
import time
import zlib

import numpy as np

from glm_rl.config import EvalConfig, RolloutConfig
from glm_rl.rollout.data import PromptRow, load_prompts, prompt_ids
from glm_rl.rollout.generation import SampleGenerator, SamplingSpec
from glm_rl.rollout.groups import generate_group
from glm_rl.rollout.rewards import Rewarder, build_rewarder
from glm_rl.rollout.samples import Sample


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c of them passing) passes."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def set_metrics(name: str, groups: list[list[Sample]]) -> dict[str, float]:
    n = len(groups[0])
    passing = [sum(s.reward > 0 for s in g) for g in groups]
    samples = [s for g in groups for s in g]
    metrics = {
        f"eval/{name}/reward_mean": float(np.mean([s.reward for s in samples])),
        f"eval/{name}/response_len_mean": float(np.mean([len(s.response_ids) for s in samples])),
    }
    for k in sorted({1, n}):
        metrics[f"eval/{name}/pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for c in passing]))
    return metrics


class Evaluator:
    def __init__(self, cfg: EvalConfig, rollout: RolloutConfig, gen: SampleGenerator, train_rewarder: Rewarder):
        self.cfg, self.rollout, self.gen = cfg, rollout, gen
        remote = cfg.eval_rm_type == "remote_rm"  # then the training reward server (--rm-url) grades eval too
        self.rewarder = (
            train_rewarder
            if cfg.eval_rm_type is None
            else build_rewarder(
                cfg.eval_rm_type,
                **{
                    **rollout.rewarder_args(),
                    "custom_rm_path": None,
                    "group_rm": False,
                    "rm_url": rollout.rm_url if remote else None,
                },
            )
        )
        self.sets: dict[str, list[tuple[PromptRow, list[int]]]] = {}
        for name, path in cfg.sets:
            rows = load_prompts(path, **cfg.data_args(rollout))
            self.sets[name] = [
                (r, prompt_ids(gen.tokenizer, r.prompt, tools=r.tools, apply_chat_template=rollout.apply_chat_template))
                for r in rows
            ]

    def spec(self, name: str) -> SamplingSpec:
        c, r = self.cfg, self.rollout
        return SamplingSpec(
            temperature=r.rollout_temperature if c.eval_temperature is None else c.eval_temperature,
            top_p=r.rollout_top_p if c.eval_top_p is None else c.eval_top_p,
            top_k=r.rollout_top_k,
            max_new_tokens=c.eval_max_response_len or r.rollout_max_response_len,
            routed=False,
            rid_prefix=f"eval-{name}-",
            seed_offset=(zlib.crc32(name.encode()) + 1) * 7_919_000,
        )

    async def run(self, step: int) -> dict[str, float]:
        """Every set's metrics at the engines' current weights (`step`: steps trained so far)."""
        t0, metrics, n = time.time(), {}, self.cfg.n_samples_per_eval_prompt
        for name, prompts in self.sets.items():
            spec = self.spec(name)
            groups = await asyncio.gather(
                *(
                    generate_group(self.gen, self.rewarder, row, ids, spec=spec, step=step, group=g, n=n)
                    for g, (row, ids) in enumerate(prompts)
                )
            )
            metrics |= set_metrics(name, list(groups))
        return metrics | {"perf/eval_s": time.time() - t0}
