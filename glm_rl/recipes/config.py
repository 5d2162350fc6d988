"""Recipe configs from the command line: dotted `key=value` overrides and validation.

`apply_overrides` applies `train.global_batch_size=128 checkpoint.save=DIR peft=lora`, type-checked against the
dataclass annotations of `RecipeConfig` (`glm_rl/recipes/schema.py`): an unknown key lists the valid keys of its
section, a bad choice lists the valid choices. `validate` checks the whole config once, before any process
group exists. The named recipes are `glm_rl/recipes/presets.py`; the names callers import from here
(`RecipeConfig`, `RecipeError`, `RECIPE_DATA`, `RECIPES`, `get_recipe`) are re-exported.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import replace
from pathlib import Path
from typing import Literal

from glm_rl.recipes.presets import RECIPES, get_recipe
from glm_rl.recipes.schema import PEFT_CHOICES, RECIPE_DATA, RecipeConfig, RecipeError, check_choice

__all__ = ["RECIPES", "RECIPE_DATA", "RecipeConfig", "RecipeError", "apply_overrides", "get_recipe", "validate"]


# -- dotted overrides -------------------------------------------------------------------------------------------
def _literal_choices(tp) -> list:
    """A Literal's values, sorted: typing caches Literals that differ only in order, so which order
    `get_args` returns depends on which module built its Literal first."""
    return sorted(typing.get_args(tp), key=str)


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
            check_choice(key, text, (None, *_literal_choices(inner)))
        return _convert(key, text, inner)
    if origin is Literal:
        check_choice(key, text, _literal_choices(tp))
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
