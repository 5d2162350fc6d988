"""Test helpers for the bring-your-own-task tests: a fake /generate (no model), and hook / filter / reward
functions reached by dotted path (`byot_helpers.<name>`; tests/ is on sys.path under pytest, and the e2e
subprocesses get it through PYTHONPATH)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib

from glm_rl.rollout.data import load_prompts, prompt_ids
from glm_rl.rollout.samples import Sample

CALLS: list[dict] = []  # what the hooks were given (the tests read it)


class FakeEngine:
    """A /generate that answers "a+b=<sum>" (right or off by one, decided by the request's seed) without a model.

    `slow(payload)` True makes a request wait until `abort()` (then it answers finish_reason "abort", as SGLang
    does), so a test controls what is still in flight when dynamic sampling reaches its target."""

    def __init__(self, tokenizer, data_path: str, slow=lambda payload: False, always_right=lambda a, b: False):
        self.tokenizer, self.slow, self.always_right = tokenizer, slow, always_right
        paths = (data_path, data_path.replace("train.jsonl", "eval.jsonl"))
        self.labels = {tuple(prompt_ids(tokenizer, r.prompt)): r.prompt for p in paths for r in load_prompts(p)}
        self.aborted = asyncio.Event()
        self.requests: list[str] = []
        self.abort_calls = 0

    async def generate(self, payload: dict) -> dict:
        self.requests.append(payload["rid"])
        if self.slow(payload):
            await self.aborted.wait()
            return self._answer([], "abort")
        await asyncio.sleep(0.001)
        a, b = (int(x) for x in self.labels[tuple(payload["input_ids"])].split("+"))
        seed = payload["sampling_params"]["sampling_seed"]
        right = self.always_right(a, b) or int(hashlib.sha256(str(seed).encode()).hexdigest(), 16) % 2 == 0
        ids = self.tokenizer.encode(f"{a}+{b}={a + b if right else a + b + 1}", add_special_tokens=False)
        return self._answer(ids, "stop")

    async def abort(self) -> None:
        self.abort_calls += 1
        self.aborted.set()

    @staticmethod
    def _answer(ids: list[int], finish: str) -> dict:
        return {
            "output_ids": ids,
            "meta_info": {
                "finish_reason": {"type": finish},
                "weight_version": 0,
                "output_token_logprobs": [[-0.5, t, None] for t in ids],
            },
        }


# -- custom generate functions (--custom-generate-function-path) ------------------------------------------------
async def generate_and_tag(ctx, sample: Sample, sampling_params: dict) -> Sample:
    """One /generate through ctx.generate; grades a fixed text so the reward shows `response_text` is used."""
    CALLS.append(
        {
            "index": sample.index,
            "label": sample.label,
            "metadata": sample.metadata,
            "tools": sample.tools,
            "params": dict(sampling_params),
            "step": ctx.step,
            "routed": ctx.return_routed_experts,
        }
    )
    out = await ctx.generate(
        {
            "input_ids": sample.prompt_ids,
            "sampling_params": sampling_params,
            "return_logprob": True,
            "rid": f"hook-{ctx.step}-{sample.index}",
        }
    )
    ids = list(out["output_ids"])
    return dataclasses.replace(
        sample,
        response_ids=ids,
        loss_mask=[1] * len(ids),
        rollout_logprobs=[lp[0] for lp in out["meta_info"]["output_token_logprobs"]],
        response_text=f"= {sample.label}",
    )


async def generate_two(ctx, sample: Sample, sampling_params: dict) -> list[Sample]:
    one = await generate_and_tag(ctx, sample, sampling_params)
    return [one, dataclasses.replace(one)]


async def generate_raises(ctx, sample: Sample, sampling_params: dict) -> Sample:
    raise KeyError("no such tool")


async def generate_wrong_type(ctx, sample: Sample, sampling_params: dict) -> dict:
    return {"response_ids": [1, 2]}


async def rollout_fixed(ctx, step: int) -> list[Sample]:
    """--rollout-function-path: the whole batch made up here (rewards included)."""
    cfg = ctx.rollout
    n = cfg.rollout_batch_size * cfg.n_samples_per_prompt
    return [
        Sample(index=99, group=99, prompt_ids=[1, 2], response_ids=[3], rollout_logprobs=[-0.1], reward=float(i % 2))
        for i in range(n)
    ]


async def rollout_short(ctx, step: int) -> list[Sample]:
    return (await rollout_fixed(ctx, step))[:3]


# -- filters (--dynamic-sampling-filter-path) --------------------------------------------------------------------
PASSED: list[tuple[int, ...]] = []


def keep_from_launch_6(cfg, samples: list[Sample]) -> bool:
    """Rejects the first six groups launched (forces more rounds), keeps the rest; records what it kept."""
    keep = samples[0].group >= 6
    if keep:
        PASSED.append(tuple(samples[0].prompt_ids))
    return keep


def filter_returns_str(cfg, samples: list[Sample]) -> str:
    return "yes"


# -- rewards (--custom-rm-path) ------------------------------------------------------------------------------------
def reward_needs_metadata(response: str, label: str, metadata: dict) -> float:
    """1 when the row's metadata arrived (its `source`), else an error."""
    if metadata.get("source") != "arith":
        raise ValueError(f"metadata missing: {metadata!r}")
    return 1.0
