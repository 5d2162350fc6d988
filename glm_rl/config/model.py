"""The `model` section: which checkpoint the policy starts from, checked against a preset, in which dtype."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from glm_rl.config.fields import opt
from glm_rl.models.glm45.presets import TINY_CHECKPOINT


@dataclass(frozen=True)
class ModelConfig:
    hf_checkpoint: str = opt(str(TINY_CHECKPOINT), "HF checkpoint the policy starts from (and engines load)")
    model_preset: str | None = opt(None, "check the checkpoint's config against this preset first")
    dtype: Literal["float32", "bfloat16"] = opt("float32", "trainer and engine dtype")
