"""The `rollout` section: prompts, sampling, and the engines behind the router (embedded or SGLang)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from glm_rl.config.fields import opt
from glm_rl.models.glm45.presets import TINY_CHECKPOINT

TINY_DATA = TINY_CHECKPOINT.parent / "arith"


@dataclass(frozen=True)
class RolloutConfig:
    prompt_data: str = opt(str(TINY_DATA / "train.jsonl"), "JSONL prompt file with `prompt` and `label`")
    rm_type: str = opt("arithmetic", "rule-based reward")
    rollout_batch_size: int = opt(16, "prompts per rollout step")
    n_samples_per_prompt: int = opt(8, "responses sampled per prompt (the GRPO group)")
    rollout_max_response_len: int = opt(16, "max new tokens per response")
    rollout_max_prompt_len: int = opt(64, "prompts longer than this (in tokens) are skipped and counted")
    rollout_temperature: float = opt(1.0, "sampling temperature")
    rollout_top_p: float = opt(1.0, "nucleus sampling")
    rollout_top_k: int = opt(-1, "top-k sampling (-1 = off)")
    rollout_shuffle: bool = opt(True, "shuffle prompts each epoch")
    num_engines: int = opt(2, "rollout engines behind the router")
    engine_api_key: str | None = opt(None, "API key engines require (Bearer token)")
    enable_mtp: bool = opt(False, "MTP speculative decoding: draft with the checkpoint's MTP layer, verify in one "
                                  "forward (distribution-exact); SGLang: EAGLE flags, topk 1")
    speculative_num_steps: int = opt(1, "with --enable-mtp: MTP draft tokens per verify forward "
                                        "(SGLang's --speculative-num-steps; num-draft-tokens = steps + 1)")
    rollout_engine: Literal["embedded", "sglang"] = opt(
        "embedded", "embedded: our torch engine (CPU, tests); sglang: SGLang 0.5.23 servers (GPU)")
    rollout_num_gpus_per_engine: int = opt(1, "GPUs per SGLang engine (its --tp-size)")
    sglang_args: tuple[tuple[str, str | None], ...] = field(
        default=(), metadata={"help": "--sglang-<flag> [value]: passed to SGLang's launch_server as --<flag>",
                              "cli": False})
