"""Accuracy of a checkpoint on a prompt set, by sampling with HF `generate` (the reference path).

Used by `glm-rl eval` and by the tiny-model maker to decide when the model is "partly trained". Prompts are
rendered exactly as the rollout renders them (`rollout.data.prompt_ids`: the chat template with the row's tools,
or verbatim with `apply_chat_template=False`), and each row's metadata reaches the reward function. Evaluation
during training runs on the rollout engines instead (`rollout/evaluation.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glm_rl.rollout.data import PromptRow, prompt_ids
from glm_rl.rollout.rewards import RewardFn


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    n: int
    responses: list[str]


def chat_prompt_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of a prompt (one user turn, or chat messages) followed by the assistant's generation prompt."""
    return prompt_ids(tokenizer, prompt)


@torch.no_grad()
def sample_responses(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 256,
) -> list[str]:
    """Sample one response per prompt (token ids; greedy when temperature == 0); left-padded batches."""
    torch.manual_seed(seed)
    eos = model.generation_config.eos_token_id
    pad = tokenizer.pad_token_id
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids = prompts[start : start + batch_size]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        sampling = (
            dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
            if temperature > 0
            else dict(do_sample=False)
        )
        gen = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            **sampling,
        )
        out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return out


def evaluate(
    model,
    tokenizer,
    rows: list[PromptRow],
    reward_fn: RewardFn,
    *,
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    seed: int = 0,
    apply_chat_template: bool = True,
) -> EvalResult:
    """Mean reward of one sampled response per row (`reward_fn(response, label, metadata)`)."""
    ids = [prompt_ids(tokenizer, r.prompt, tools=r.tools, apply_chat_template=apply_chat_template) for r in rows]
    responses = sample_responses(
        model, tokenizer, ids, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed
    )
    rewards = [reward_fn(resp, row.label, row.metadata) for resp, row in zip(responses, rows)]
    return EvalResult(accuracy=sum(rewards) / max(len(rows), 1), n=len(rows), responses=responses)
