"""Prompt datasets: JSONL rows with `prompt` and `label`, validated on load.

A malformed row raises an error naming the file and line before any work starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    label: str
    index: int  # position in the file, 0-based


class DataError(ValueError):
    """A prompt file that cannot be used; the message names the file and line."""


def load_prompts(path: str | Path, prompt_key: str = "prompt", label_key: str = "label") -> list[PromptRow]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompt file not found")
    rows: list[PromptRow] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for key in (prompt_key, label_key):
                if key not in obj:
                    raise DataError(f"{where}: missing field {key!r} (fields present: {sorted(obj)})")
            if not isinstance(obj[prompt_key], str) or not obj[prompt_key]:
                raise DataError(f"{where}: field {prompt_key!r} must be a non-empty string")
            rows.append(PromptRow(prompt=obj[prompt_key], label=str(obj[label_key]), index=len(rows)))
    if not rows:
        raise DataError(f"{path}: no prompt rows")
    return rows
