"""`opt`: a dataclass field that carries its command-line help.

Every section field is a flag named after the field (`--rollout-batch-size`); metadata `cli=False` keeps a
field off the command line (set by the parser itself, e.g. the `--sglang-*` pass-through).
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})
