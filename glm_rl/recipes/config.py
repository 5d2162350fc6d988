"""Training recipes beyond RL: typed configs, the named recipe functions, and dotted `key=value` overrides.

A recipe is a plain function returning a frozen `RecipeConfig` (torchtitan's habit: an experiment is a named
function). Keyword arguments of the function cover what the GLM-4.5 documentation says users change (parallel
sizes, MTP, PEFT, learning rates); anything else is a dotted override applied by `apply_overrides`
(`train.global_batch_size=128 checkpoint.save=DIR peft=lora`), type-checked against the dataclass annotations:
an unknown key lists the valid keys of its section, a bad choice lists the valid choices. `validate` checks the
whole config once, before any process group exists. Each recipe function hands all its keywords
(`**locals()`) to one shared builder (`_pretrain` / `_finetune`), so the signature is the documentation.

Default layouts are the model tables': 355B pretrain / full SFT TP2 PP8 EP16 on 256 GPUs, PEFT TP2 PP4 EP4 on
32; Air pretrain / full SFT TP1 PP4 EP8 on 32, PEFT TP1 PP2 EP4 on 8 (one node). Expert-TP is 1 (whole
experts per rank) and sequence parallel follows TP (on when TP > 1; Megatron requires it for MoE with TP).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from glm_rl.models.glm45.presets import ASSETS, TINY_CHECKPOINT

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


# -- recipes ----------------------------------------------------------------------------------------------------
def _parallel(tp: int, pp: int, ep: int, gpus: int, sp: bool | None, preset: str) -> ParallelSection:
    """The layout; when PP does not divide the layers, the first and last stages take the remainder off
    (e.g. 92 layers / PP8 = [10, 12 x 6, 10]), as the model's tables do."""
    from glm_rl.models.glm45.presets import get_preset

    layers, first_last = get_preset(preset).num_hidden_layers, None
    if pp > 2 and layers % pp:
        inner = -(-layers // pp)
        rest = layers - inner * (pp - 2)
        first_last = (rest // 2, rest - rest // 2)
    return ParallelSection(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        num_gpus=gpus,
        sequence_parallel=sp,
        decoder_first_pipeline_num_layers=first_last and first_last[0],
        decoder_last_pipeline_num_layers=first_last and first_last[1],
    )


def _pretrain(
    name: str,
    preset: str,
    layout: tuple[int, int, int, int],
    *,
    data_path,
    train_iters,
    global_batch_size,
    micro_batch_size,
    seq_length,
    lr,
    min_lr,
    lr_warmup_iters,
    mtp_num_layers,
    mtp_loss_scaling_factor,
    recompute_granularity,
    recompute_method,
    recompute_num_layers,
    tp,
    pp,
    ep,
    sequence_parallel,
    hf_checkpoint=None,
    dtype="bfloat16",
) -> RecipeConfig:
    dtp, dpp, dep, gpus = layout
    return RecipeConfig(
        name=name,
        model=ModelSection(preset=preset, hf_checkpoint=hf_checkpoint, dtype=dtype),
        data=DataSection(kind="pretrain", path=data_path, seq_length=seq_length),
        train=TrainSection(
            train_iters=train_iters,
            global_batch_size=global_batch_size,
            micro_batch_size=micro_batch_size,
            lr=lr,
            min_lr=min_lr,
            lr_warmup_iters=lr_warmup_iters,
        ),
        parallel=_parallel(tp or dtp, pp or dpp, ep or dep, gpus, sequence_parallel, preset),
        mtp=MTPSection(mtp_num_layers=mtp_num_layers, mtp_loss_scaling_factor=mtp_loss_scaling_factor),
        recompute=RecomputeSection(
            granularity=recompute_granularity, method=recompute_method, num_layers=recompute_num_layers
        ),
    )


def _finetune(
    name: str,
    preset: str,
    full: tuple[int, int, int, int],
    peft_layout: tuple[int, int, int, int],
    *,
    pretrained_checkpoint,
    peft,
    finetune_lr,
    data_path,
    train_iters,
    global_batch_size,
    micro_batch_size,
    seq_length,
    tp,
    pp,
    ep,
    sequence_parallel,
    lora_rank=32,
    lora_alpha=32.0,
    dtype="bfloat16",
    min_lr=0.0,
    lr_warmup_iters=50,
    recompute_granularity="full",
) -> RecipeConfig:
    _check_choice("peft", peft, PEFT_CHOICES)
    dtp, dpp, dep, gpus = peft_layout if peft else full
    return RecipeConfig(
        name=name,
        model=ModelSection(preset=preset, dtype=dtype),
        data=DataSection(kind="sft", path=data_path, seq_length=seq_length),
        train=TrainSection(
            train_iters=train_iters,
            global_batch_size=global_batch_size,
            micro_batch_size=micro_batch_size,
            lr=finetune_lr,
            min_lr=min_lr,
            lr_warmup_iters=lr_warmup_iters,
            weight_decay=0.0 if peft else 0.1,
        ),
        parallel=_parallel(tp or dtp, pp or dpp, ep or dep, gpus, sequence_parallel, preset),
        mtp=MTPSection(mtp_num_layers=None, mtp_loss_scaling_factor=None),
        recompute=RecomputeSection(granularity=recompute_granularity),
        peft=peft,
        lora=LoraSection(rank=lora_rank, alpha=lora_alpha),
        pretrained_checkpoint=pretrained_checkpoint,
    )


def glm45_355b_pretrain_config(
    *,
    data_path=None,
    train_iters=1_000_000,
    global_batch_size=2048,
    micro_batch_size=1,
    seq_length=4096,
    lr=1e-4,
    min_lr=1e-5,
    lr_warmup_iters=2000,
    mtp_num_layers=1,
    mtp_loss_scaling_factor=0.3,
    recompute_granularity="full",
    recompute_method="uniform",
    recompute_num_layers=1,
    tp=None,
    pp=None,
    ep=None,
    sequence_parallel=None,
) -> RecipeConfig:
    """GLM-4.5 355B-A32B pretraining: TP2 PP8 EP16 on 256 GPUs, MTP 1 layer (loss × 0.3)."""
    return _pretrain("glm45_355b_pretrain", "glm45-355b-a32b", (2, 8, 16, 256), **locals())


def glm45_air_106b_pretrain_config(
    *,
    data_path=None,
    train_iters=1_000_000,
    global_batch_size=2048,
    micro_batch_size=1,
    seq_length=4096,
    lr=1e-4,
    min_lr=1e-5,
    lr_warmup_iters=2000,
    mtp_num_layers=1,
    mtp_loss_scaling_factor=0.3,
    recompute_granularity="full",
    recompute_method="uniform",
    recompute_num_layers=1,
    tp=None,
    pp=None,
    ep=None,
    sequence_parallel=None,
) -> RecipeConfig:
    """GLM-4.5-Air 106B-A12B pretraining: TP1 PP4 EP8 on 32 GPUs, MTP 1 layer (loss × 0.3)."""
    return _pretrain("glm45_air_106b_pretrain", "glm45-air-106b-a12b", (1, 4, 8, 32), **locals())


def glm45_355b_finetune_config(
    *,
    pretrained_checkpoint=None,
    peft="lora",
    finetune_lr=1e-4,
    data_path=None,
    train_iters=1000,
    global_batch_size=128,
    micro_batch_size=1,
    seq_length=4096,
    tp=None,
    pp=None,
    ep=None,
    sequence_parallel=None,
    lora_rank=32,
    lora_alpha=32.0,
) -> RecipeConfig:
    """GLM-4.5 355B-A32B finetuning: full SFT TP2 PP8 EP16 (256 GPUs), LoRA / DoRA TP2 PP4 EP4 (32 GPUs)."""
    return _finetune("glm45_355b_finetune", "glm45-355b-a32b", (2, 8, 16, 256), (2, 4, 4, 32), **locals())


def glm45_air_106b_finetune_config(
    *,
    pretrained_checkpoint=None,
    peft="lora",
    finetune_lr=1e-4,
    data_path=None,
    train_iters=1000,
    global_batch_size=128,
    micro_batch_size=1,
    seq_length=4096,
    tp=None,
    pp=None,
    ep=None,
    sequence_parallel=None,
    lora_rank=32,
    lora_alpha=32.0,
) -> RecipeConfig:
    """GLM-4.5-Air finetuning: full SFT TP1 PP4 EP8 (32 GPUs), LoRA / DoRA TP1 PP2 EP4 (8 GPUs, one node)."""
    return _finetune("glm45_air_106b_finetune", "glm45-air-106b-a12b", (1, 4, 8, 32), (1, 2, 4, 8), **locals())


def glm45_tiny_pretrain_config(
    *,
    data_path=str(RECIPE_DATA / "pretrain.jsonl"),
    train_iters=20,
    global_batch_size=8,
    micro_batch_size=4,
    seq_length=64,
    lr=3e-3,
    min_lr=3e-4,
    lr_warmup_iters=2,
    mtp_num_layers=1,
    mtp_loss_scaling_factor=0.3,
    recompute_granularity=None,
    recompute_method="uniform",
    recompute_num_layers=1,
    tp=None,
    pp=None,
    ep=None,
    sequence_parallel=None,
) -> RecipeConfig:
    """The tiny GLM-4.5 (CPU, fp32) pretraining on arithmetic text, starting from random weights, MTP on."""
    return _pretrain(
        "glm45_tiny_pretrain",
        "glm45-tiny",
        (1, 1, 1, 1),
        hf_checkpoint=str(TINY_CHECKPOINT),
        dtype="float32",
        **locals(),
    )


def glm45_tiny_finetune_config(
    *,
    pretrained_checkpoint=str(TINY_CHECKPOINT),
    peft=None,
    finetune_lr=None,
    data_path=str(RECIPE_DATA / "sft.jsonl"),
    train_iters=20,
    global_batch_size=8,
    micro_batch_size=4,
    seq_length=64,
    tp=None,
    pp=None,
    ep=None,
    sequence_parallel=None,
    lora_rank=8,
    lora_alpha=16.0,
) -> RecipeConfig:
    """The tiny GLM-4.5 (CPU, fp32) chat SFT on arithmetic; `peft` None (full), "lora" or "dora"."""
    kwargs = dict(locals())
    lr = kwargs.pop("finetune_lr")
    lr = lr if lr is not None else (1e-2 if peft else 2e-3)
    return _finetune(
        "glm45_tiny_finetune",
        "glm45-tiny",
        (1, 1, 1, 1),
        (1, 1, 1, 1),
        dtype="float32",
        recompute_granularity=None,
        finetune_lr=lr,
        min_lr=lr / 10,
        lr_warmup_iters=2,
        **kwargs,
    )


RECIPES = {
    f.__name__.removesuffix("_config"): f
    for f in (
        glm45_355b_pretrain_config,
        glm45_air_106b_pretrain_config,
        glm45_355b_finetune_config,
        glm45_air_106b_finetune_config,
        glm45_tiny_pretrain_config,
        glm45_tiny_finetune_config,
    )
}


def get_recipe(name: str, **kwargs) -> RecipeConfig:
    """The recipe `name` (with or without the `_config` suffix) built with keyword arguments `kwargs`."""
    key = name.removesuffix("_config")
    if key not in RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
    return RECIPES[key](**kwargs)


# -- dotted overrides -------------------------------------------------------------------------------------------
def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise RecipeError(f"{key}={value!r}: not a valid choice; valid: {', '.join(map(str, choices))}")


def _convert(key: str, text: str, tp):
    """`text` as the annotated type `tp` (Optional, Literal, bool, int, float, str)."""
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null"):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)][0]
        if typing.get_origin(inner) is Literal:  # list None among the choices
            _check_choice(key, text, (None, *typing.get_args(inner)))
        return _convert(key, text, inner)
    if origin is Literal:
        _check_choice(key, text, args)
        return text
    if tp is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise RecipeError(f"{key}={text!r}: expected a bool (true / false)")
        return text.lower() in ("true", "1", "yes")
    try:
        return tp(text)
    except (TypeError, ValueError):
        raise RecipeError(f"{key}={text!r}: expected {tp.__name__}") from None


def _set(obj, parts: list[str], text: str, full_key: str):
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    head = parts[0]
    if head not in names:
        prefix = full_key[: len(full_key) - len(".".join(parts))]
        valid = [prefix + n for n in names]
        raise RecipeError(f"unknown override key {full_key!r}; valid keys here: {', '.join(valid)}")
    current = getattr(obj, head)
    if len(parts) == 1:
        if dataclasses.is_dataclass(current):
            sub = [f"{full_key}.{f.name}" for f in dataclasses.fields(current)]
            raise RecipeError(f"{full_key!r} is a section; set one of: {', '.join(sub)}")
        return replace(obj, **{head: _convert(full_key, text, hints[head])})
    if not dataclasses.is_dataclass(current):
        raise RecipeError(
            f"unknown override key {full_key!r}: {'.'.join(full_key.split('.')[: -len(parts) + 1])} "
            f"is a value, not a section"
        )
    return replace(obj, **{head: _set(current, parts[1:], text, full_key)})


def apply_overrides(cfg: RecipeConfig, overrides: list[str]) -> RecipeConfig:
    """`cfg` with each `dotted.key=value` applied, in order; errors name the key and the valid keys/choices."""
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise RecipeError(f"override {item!r}: expected dotted.key=value (e.g. train.global_batch_size=128)")
        cfg = _set(cfg, key.strip().split("."), text.strip(), key.strip())
    return cfg


# -- validation -------------------------------------------------------------------------------------------------
def validate(cfg: RecipeConfig) -> RecipeConfig:
    """Every problem of `cfg` at once (RecipeError), before any process group or model exists."""
    from glm_rl.models.glm45.presets import PRESETS

    t, p, problems = cfg.train, cfg.parallel, []
    if cfg.model.preset not in PRESETS:
        problems.append(f"model.preset={cfg.model.preset!r}; valid: {', '.join(PRESETS)}")
    if cfg.peft not in PEFT_CHOICES:
        problems.append(f"peft={cfg.peft!r}; valid: {', '.join(map(str, PEFT_CHOICES))}")
    if cfg.peft and not cfg.is_finetune:
        problems.append(f"peft={cfg.peft} needs a finetune recipe (data.kind=sft)")
    for key, value in (
        ("train.train_iters", t.train_iters),
        ("train.global_batch_size", t.global_batch_size),
        ("train.micro_batch_size", t.micro_batch_size),
        ("data.seq_length", cfg.data.seq_length),
        ("lora.rank", cfg.lora.rank),
    ):
        if value < 1:
            problems.append(f"{key}={value}: must be >= 1")
    if t.global_batch_size % t.micro_batch_size:
        problems.append(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size}"
        )
    if not 0 <= t.min_lr <= t.lr:
        problems.append(f"train.min_lr={t.min_lr} must be in [0, train.lr={t.lr}]")
    if p.tensor_model_parallel_size > 1 and not p.sequence_parallel_on:
        problems.append(
            "parallel.sequence_parallel=false with TP > 1: Megatron needs sequence parallel for MoE "
            "with tensor parallelism"
        )
    if cfg.mtp.mtp_num_layers is not None and cfg.mtp.mtp_num_layers < 0:
        problems.append(f"mtp.mtp_num_layers={cfg.mtp.mtp_num_layers}: must be >= 0 (or None)")
    ckpt = cfg.pretrained_checkpoint
    if cfg.is_finetune and ckpt is None:
        problems.append(
            "pretrained_checkpoint is not set: a finetune recipe needs --pretrained-checkpoint DIR "
            "(an HF checkpoint directory)"
        )
    elif ckpt is not None and not (Path(ckpt) / "config.json").is_file():
        problems.append(f"pretrained_checkpoint {ckpt}: no such HF checkpoint (expected a directory with config.json)")
    if cfg.mtp.enabled and cfg.mtp.mtp_num_layers > 1 and p.context_parallel_size > 1:
        problems.append(
            f"mtp.mtp_num_layers={cfg.mtp.mtp_num_layers} with parallel.context_parallel_size="
            f"{p.context_parallel_size}: the trainer weights one MTP layer exactly under CP; use 1"
        )
    if cfg.data.path is not None and not Path(cfg.data.path).is_file():
        problems.append(f"data.path {cfg.data.path}: no such file")
    if problems:
        raise RecipeError(f"recipe {cfg.name}: " + "; ".join(problems))
    return cfg
