"""argv → a validated `RunConfig`: one argparse group per section, the flag named after the field.

Booleans are `--flag` / `--no-flag` (`bool | None` fields stay None, "auto", when neither is given); Literal
fields become choices; `tuple[str, ...]` fields take one or more words (`--eval-prompt-data NAME PATH ...`).
`--sglang-<flag> [value]` pairs are taken out of argv first and passed to SGLang.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Literal, get_args, get_origin, get_type_hints

from glm_rl.config.agentic import AgenticConfig
from glm_rl.config.algo import AlgoConfig
from glm_rl.config.asynchrony import AsyncConfig
from glm_rl.config.debug import DebugConfig
from glm_rl.config.eval import EvalConfig
from glm_rl.config.log import LogConfig
from glm_rl.config.lora import LoraConfig
from glm_rl.config.megatron import MegatronConfig
from glm_rl.config.model import ModelConfig
from glm_rl.config.rollout import RolloutConfig
from glm_rl.config.run import RunConfig
from glm_rl.config.sync import SyncConfig
from glm_rl.config.train import TrainConfig

# section name → its dataclass, in --help order (the flags' order is the one `glm-rl train --help` always had)
SECTIONS = {
    "model": ModelConfig,
    "rollout": RolloutConfig,
    "algo": AlgoConfig,
    "train": TrainConfig,
    "megatron": MegatronConfig,
    "lora": LoraConfig,
    "sync": SyncConfig,
    "eval": EvalConfig,
    "log": LogConfig,
    "debug": DebugConfig,
    "agentic": AgenticConfig,
    "asynchrony": AsyncConfig,
}


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, hint: Any, dest: str) -> None:
    flag = "--" + f.name.replace("_", "-")
    help_text = f.metadata.get("help", "")
    if hint is bool:
        parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        return
    args = get_args(hint)
    if get_origin(hint) is tuple:  # tuple[str, ...]: one or more words, kept as a tuple (the config is frozen)
        parser.add_argument(
            flag,
            dest=dest,
            nargs="+",
            type=args[0],
            default=f.default,
            help=help_text,
            metavar=f.metadata.get("metavar", args[0].__name__.upper()),
        )
        return
    if get_origin(hint) is Literal:
        parser.add_argument(flag, dest=dest, choices=args, default=f.default, help=help_text)
        return
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if base is bool:  # `bool | None`: --flag / --no-flag, None when neither is given (an "auto" default)
        parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        return
    if get_origin(base) is Literal:
        parser.add_argument(flag, dest=dest, choices=get_args(base), default=f.default, help=help_text)
        return
    parser.add_argument(
        flag, dest=dest, type=base, default=f.default, metavar=base.__name__.upper(), help=help_text
    )  # the formatter appends "(default: …)"


def _is_flag(f: dataclasses.Field) -> bool:
    return f.init and f.metadata.get("cli", True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glm-rl train",
        description="Run RL post-training.",
        epilog="--sglang-<flag> [value] passes --<flag> [value] to every SGLang server (--rollout-engine "
        "sglang), checked against the pinned SGLang's flags.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if _is_flag(f):
                _add_field(group, f, hints[f.name], f"{section}.{f.name}")
    hints = get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if f.name not in SECTIONS:
            _add_field(parser, f, hints[f.name], f.name)
    return parser


def split_sglang_args(argv: list[str]) -> tuple[list[str], tuple[tuple[str, str | None], ...]]:
    """Take `--sglang-<flag> [value]` pairs out of argv (slime's pass-through to SGLang's server flags)."""
    rest, passed = [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--sglang-"):
            name, _, inline = token[len("--sglang-") :].partition("=")
            if inline:
                passed.append((name, inline))
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                passed.append((name, argv[i + 1]))
                i += 1
            else:
                passed.append((name, None))
        else:
            rest.append(token)
        i += 1
    return rest, tuple(passed)


def parse_args(argv: list[str]) -> RunConfig:
    """argv (without the command name) → a validated RunConfig."""
    argv, sglang_args = split_sglang_args(argv)
    ns = vars(build_parser().parse_args(argv))
    ns["rollout.sglang_args"] = sglang_args
    ns = {k: tuple(v) if isinstance(v, list) else v for k, v in ns.items()}
    sections = {
        name: cls(**{k.split(".", 1)[1]: v for k, v in ns.items() if k.startswith(name + ".")})
        for name, cls in SECTIONS.items()
    }
    top = {k: v for k, v in ns.items() if "." not in k}
    return RunConfig(**sections, **top).validate()
