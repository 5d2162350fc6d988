"""Accuracy of a checkpoint on a prompt set, by sampling with HF `generate` (the reference path).

Used by `glm-rl eval` and by the tiny-model maker to decide when the model is "partly trained".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glm_rl.rollout.data import PromptRow
from glm_rl.rollout.rewards import RewardFn


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    n: int
    responses: list[str]


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a user turn followed by the assistant's generation prompt (the model's chat template)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: list[str], *, temperature: float, max_new_tokens: int,
                     seed: int, batch_size: int = 256) -> list[str]:
    """Sample one response per prompt (greedy when temperature == 0); left-padded batches."""
    torch.manual_seed(seed)
    eos = model.generation_config.eos_token_id
    pad = tokenizer.pad_token_id
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids = [chat_prompt_ids(tokenizer, p) for p in prompts[start:start + batch_size]]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 \
            else dict(do_sample=False)
        gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             eos_token_id=eos, pad_token_id=pad, **sampling)
        out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return out


def evaluate(model, tokenizer, rows: list[PromptRow], reward_fn: RewardFn, *, temperature: float = 1.0,
             max_new_tokens: int = 16, seed: int = 0) -> EvalResult:
    responses = sample_responses(model, tokenizer, [r.prompt for r in rows], temperature=temperature,
                                 max_new_tokens=max_new_tokens, seed=seed)
    rewards = [reward_fn(resp, row.label) for resp, row in zip(responses, rows)]
    return EvalResult(accuracy=sum(rewards) / max(len(rows), 1), n=len(rows), responses=responses)
