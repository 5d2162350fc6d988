"""The typed recipe config: `RecipeConfig` and its sections (frozen dataclasses), and `RecipeError`.

The one description of what a recipe can set: the named recipes (`glm_rl/recipes/presets.py`) build these, and
the dotted overrides (`glm_rl/recipes/config.py`) are type-checked against their annotations, so a field added
here is settable as `section.field=value` at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from glm_rl.models.glm45.presets import ASSETS

RECIPE_DATA = ASSETS / "recipes"
PEFT_CHOICES = (None, "lora", "dora")


class RecipeError(ValueError):
    """Bad recipe input; the message names the key / value and what was expected."""


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    preset: str  # glm_rl.models.glm45.presets name
    hf_checkpoint: str | None = None  # pretrain: HF dir for the tokenizer (weights start random)
    dtype: Literal["float32", "bfloat16"] = "bfloat16"


@dataclass(frozen=True, kw_only=True)
class DataSection:
    kind: Literal["pretrain", "sft"]  # raw / tokenized text, or chat messages (assistant-only loss)
    path: str | None = None  # JSONL (or Parquet, through HF `datasets` when installed)
    seq_length: int = 4096  # tokens per packed row
    text_key: str = "text"  # pretrain: field holding raw text (or `input_ids` if tokenized)


@dataclass(frozen=True, kw_only=True)
class TrainSection:
    train_iters: int = 1000
    global_batch_size: int = 256  # packed rows per optimizer step, over all DP ranks
    micro_batch_size: int = 1  # rows per forward/backward
    lr: float = 1e-4  # peak learning rate (finetune recipes set it from `finetune_lr`)
    min_lr: float = 1e-5  # end of the cosine decay
    lr_warmup_iters: int = 100  # linear warmup from 0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    seed: int = 1234
    log_interval: int = 1


@dataclass(frozen=True, kw_only=True)
class ParallelSection:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool | None = None  # None: on when TP > 1
    decoder_first_pipeline_num_layers: int | None = None  # uneven PP split (92 / 8 and 46 / 4 need it)
    decoder_last_pipeline_num_layers: int | None = None
    num_gpus: int = 1  # the documented GPU count the layout is planned for

    @property
    def sequence_parallel_on(self) -> bool:
        return self.tensor_model_parallel_size > 1 if self.sequence_parallel is None else self.sequence_parallel

    def layout(self, world_size: int | None = None):
        """This section as a `glm_rl.parallel.ParallelLayout`; with `world_size`, DP derived from it (a size
        TP × PP × CP does not divide raises `LayoutError`), else DP 1."""
        from glm_rl.parallel import ParallelLayout

        fields = dict(
            tp=self.tensor_model_parallel_size,
            pp=self.pipeline_model_parallel_size,
            cp=self.context_parallel_size,
            ep=self.expert_model_parallel_size,
            etp=self.expert_tensor_parallel_size,
            sequence_parallel=self.sequence_parallel_on,
            decoder_first_pipeline_num_layers=self.decoder_first_pipeline_num_layers,
            decoder_last_pipeline_num_layers=self.decoder_last_pipeline_num_layers,
        )
        return ParallelLayout(**fields) if world_size is None else ParallelLayout.for_world_size(world_size, **fields)


@dataclass(frozen=True, kw_only=True)
class MTPSection:
    mtp_num_layers: int | None = 1
    mtp_loss_scaling_factor: float | None = 0.3  # None or 0: MTP off

    @property
    def enabled(self) -> bool:
        return bool(self.mtp_num_layers) and bool(self.mtp_loss_scaling_factor)


@dataclass(frozen=True, kw_only=True)
class RecomputeSection:
    granularity: Literal["selective", "full"] | None = None
    method: Literal["uniform", "block"] = "uniform"
    num_layers: int = 1


@dataclass(frozen=True, kw_only=True)
class LoraSection:
    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: str = "linear_qkv,linear_proj,linear_fc1,linear_fc2"  # comma list of Megatron leaf names


@dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    save: str | None = None  # output dir: metrics.jsonl, final weights / adapter
    save_interval: int | None = None  # iterations between saves (None: only at the end)


@dataclass(frozen=True, kw_only=True)
class RecipeConfig:
    name: str
    model: ModelSection
    data: DataSection
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    mtp: MTPSection = field(default_factory=MTPSection)
    recompute: RecomputeSection = field(default_factory=RecomputeSection)
    peft: Literal["lora", "dora"] | None = None  # None: full SFT / pretrain
    lora: LoraSection = field(default_factory=LoraSection)
    pretrained_checkpoint: str | None = None  # HF checkpoint dir to start from (finetune; pretrain: continued)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)

    @property
    def is_finetune(self) -> bool:
        return self.data.kind == "sft"


def check_choice(key: str, value, choices) -> None:
    """RecipeError naming `key` and the valid `choices` unless `value` is one of them."""
    if value not in choices:
        raise RecipeError(f"{key}={value!r}: not a valid choice; valid: {', '.join(map(str, choices))}")
