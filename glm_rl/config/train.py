"""The `train` section: what every trainer backend reads (which backend, world size, batching, optimizer).

Megatron's parallel layout lives in the `megatron` section and LoRA adapters in the `lora` section; the flag
names are unchanged (`--tensor-model-parallel-size`, `--lora-rank`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from glm_rl.config.fields import opt


@dataclass(frozen=True)
class TrainConfig:
    backend: Literal["torch", "megatron"] = opt(
        "torch",
        "trainer backend: torch (HF model, data parallel; reference) or megatron (megatron-core GPTModel: TP/SP/EP/DP)",
    )
    num_trainer_ranks: int = opt(2, "trainer world size (megatron: TP x PP x CP x DP)")
    global_batch_size: int | None = opt(None, "samples per optimizer step (default: one step per rollout)")
    max_tokens_per_gpu: int = opt(2048, "micro-batch token budget per rank")
    lr: float = opt(3e-4, "AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.98, "AdamW beta2")
    clip_grad: float = opt(1.0, "gradient-norm clip")
