"""Greedy text straight from a Megatron torch_dist checkpoint (`glm-rl generate --megatron-path`).

A check that a converted checkpoint holds the model HF holds: Megatron's own model (built and loaded on one CPU
rank by `glm_rl.convert`'s machinery) decodes greedily, recomputing the whole sequence each step, and the text
must equal HF's greedy text. Its own module because it is a use of a checkpoint, not a conversion: the input
checks stay cheap (`check_generate`, before any rank), the decoding runs in `generate_worker` on a rank.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from glm_rl import convert
from glm_rl.convert import build_model, check_pair, megatron_ranks
from glm_rl.models.glm45.presets import ModelSpec
from glm_rl.parallel import ParallelLayout


@dataclass(frozen=True)
class GenerateJob:
    load: Path
    prompts: tuple[tuple[int, ...], ...]  # token ids, chat template already applied
    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    result: Path


def check_generate(megatron_path: str | Path, hf_model: str | Path) -> ModelSpec:
    """A torch_dist checkpoint and the HF directory that supplies its tokenizer, with the same architecture."""
    return check_pair(Path(megatron_path), Path(hf_model), "--hf-model")


@torch.no_grad()
def greedy(model, spec: ModelSpec, prompt: list[int], max_new_tokens: int, eos: set[int]) -> dict:
    """Greedy decoding recomputing the whole sequence each step (no KV cache: fine for checks on small
    models). Logits are sliced to the real vocab, so Megatron's padded rows never win."""
    ids, logprobs, finish = list(prompt), [], "length"
    for _ in range(min(max_new_tokens, spec.max_position_embeddings - len(prompt))):
        x = torch.tensor([ids])  # (1, T)
        logits = model(x, torch.arange(len(ids))[None], attention_mask=None)[0, -1, : spec.vocab_size].float()
        token = int(logits.argmax())
        ids.append(token)
        logprobs.append(float(torch.log_softmax(logits, dim=-1)[token]))
        if token in eos:
            finish = "stop"
            break
    return {"output_ids": ids[len(prompt) :], "logprobs": logprobs, "finish_reason": finish}


def generate_worker(rank: int, world: int, init_method: str, job: GenerateJob) -> None:
    from glm_rl.trainer.backends.megatron.dist_checkpoint import load_model, read_meta

    meta = read_meta(job.load)
    spec = ModelSpec.from_hf_config(meta["hf_config"], name=job.load.name)
    with megatron_ranks(rank, world, init_method, ParallelLayout()):
        model = build_model(spec, ParallelLayout(), getattr(torch, meta["dtype"]), mtp=False)  # decoding needs no MTP
        load_model(model, job.load)  # reads only the tensors this model asks for
        out = [greedy(model, spec, list(p), job.max_new_tokens, set(job.eos_token_ids)) for p in job.prompts]
    torch.save(out, job.result)


def megatron_generate(
    megatron_path: str | Path,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_ids: list[int],
    in_process: bool = False,
) -> list[dict]:
    """Greedy continuations of `prompts` by the torch_dist checkpoint's model (one CPU rank, TP1)."""
    with tempfile.TemporaryDirectory(prefix="glm_rl_generate_") as tmp:
        job = GenerateJob(
            Path(megatron_path),
            tuple(map(tuple, prompts)),
            max_new_tokens,
            tuple(eos_token_ids),
            Path(tmp) / "result.pt",
        )
        convert.run(generate_worker, 1, job, in_process=in_process)  # via the module: tests swap `run`
        return torch.load(job.result)
