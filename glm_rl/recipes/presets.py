"""The named recipes: one function per experiment, returning a `RecipeConfig` (torchtitan's habit).

Keyword arguments of each function cover what the GLM-4.5 documentation says users change (parallel sizes,
MTP, PEFT, learning rates); anything else is a dotted override (`glm_rl/recipes/config.py`). Each recipe
function hands all its keywords (`**locals()`) to one shared builder (`_pretrain` / `_finetune`), so the
signature is the documentation. `RECIPES` / `get_recipe` look them up by name.

Default layouts are the model tables': 355B pretrain / full SFT TP2 PP8 EP16 on 256 GPUs, PEFT TP2 PP4 EP4 on
32; Air pretrain / full SFT TP1 PP4 EP8 on 32, PEFT TP1 PP2 EP4 on 8 (one node). Expert-TP is 1 (whole
experts per rank) and sequence parallel follows TP (on when TP > 1; Megatron requires it for MoE with TP).
"""

from __future__ import annotations

from glm_rl.models.glm45.presets import TINY_CHECKPOINT
from glm_rl.recipes.schema import (
    PEFT_CHOICES,
    RECIPE_DATA,
    DataSection,
    LoraSection,
    ModelSection,
    MTPSection,
    ParallelSection,
    RecipeConfig,
    RecipeError,
    RecomputeSection,
    TrainSection,
    check_choice,
)


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
    check_choice("peft", peft, PEFT_CHOICES)
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
