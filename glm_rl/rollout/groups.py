"""One group: the samples of one prompt, generated concurrently, then rewarded together.

The reward grades `sample.response_text` when a custom generate function set it (e.g. the final answer of a
tool-using episode), else the decoded response ids; it sees the row's label, the sample's metadata (the row's,
plus whatever a hook added) and the row's prompt. Rewards run per group (`Rewarder.score_group`), which is
what `--group-rm` reward models need and what the dynamic-sampling filter then judges.
"""

from __future__ import annotations

import asyncio

from glm_rl.rollout.data import PromptRow
from glm_rl.rollout.generation import HOOK_FLAG, HookError, SampleGenerator, SamplingSpec
from glm_rl.rollout.rewards import Rewarder, RewardRequest
from glm_rl.rollout.samples import Sample


def templates(row: PromptRow, prompt_ids: list[int], group: int, n: int) -> list[Sample]:
    """The samples of one group before generation: prompt, label, metadata and tools from the row."""
    return [
        Sample(
            index=group * n + k,
            group=group,
            prompt_ids=list(prompt_ids),
            response_ids=[],
            rollout_logprobs=[],
            label=row.label,
            metadata=dict(row.metadata),
            tools=list(row.tools) if row.tools is not None else None,
        )
        for k in range(n)
    ]


async def generate_group(
    gen: SampleGenerator,
    rewarder: Rewarder,
    row: PromptRow,
    prompt_ids: list[int],
    *,
    spec: SamplingSpec,
    step: int,
    group: int,
    n: int,
) -> list[Sample]:
    """`n` samples of `row` with their rewards."""
    outs = await asyncio.gather(*(gen.sample(t, spec, step) for t in templates(row, prompt_ids, group, n)))
    samples = [s for out in outs for s in out]
    if len(samples) != n:
        raise HookError(
            f"{HOOK_FLAG} {gen.cfg.custom_generate_function_path}: group {gen.rid(spec, step, group * n)}"
            f"… has {len(samples)} samples, expected {n} (a group keeps --n-samples-per-prompt samples: "
            "advantages are taken per group)"
        )
    requests = [
        RewardRequest(
            _graded_text(gen, s),
            label=row.label,
            metadata=s.metadata or {},
            prompt=row.prompt,
            name=gen.rid(spec, step, s.index),
        )
        for s in samples
    ]
    for s, reward in zip(samples, await rewarder.score_group(requests)):
        s.reward = reward
    return samples


def _graded_text(gen: SampleGenerator, s: Sample) -> str:
    if s.response_text is not None:
        return s.response_text
    return gen.tokenizer.decode(s.response_ids, skip_special_tokens=True)


def renumber(groups: list[list[Sample]]) -> list[Sample]:
    """The kept groups as one batch: group = position, index = position in the batch (groups contiguous)."""
    out = []
    for g, samples in enumerate(groups):
        for s in samples:
            s.group, s.index = g, len(out)
            out.append(s)
    return out
