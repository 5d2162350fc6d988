"""Prompt datasets: JSONL, Parquet, or a directory saved by HF `datasets` (`save_to_disk`), validated on load.

Columns are picked by key (slime's flags): input `prompt`, label `label`, metadata `metadata`, tools `tools`. A key
may be dotted to reach into a nested column (DAPO-Math-17k keeps its answer at `reward_model.ground_truth`).
- input: a non-empty string, or a list of chat messages `[{"role": "user", "content": "…"}, …]`.
- label: required; numbers become strings ("3"), lists and objects JSON text.
- metadata: an object (or a JSON string of one); missing or null is {}. It travels with the row to the reward
  function (`PromptRow.metadata`).
- tools: a list of tool schemas (or a JSON string of one), handed to the chat template; missing is None.

Chat template (`apply_chat_template`, default True, which is how glm_rl has always sent prompts and what the
tiny demo model was trained on): `prompt_ids` renders the prompt with the checkpoint's own template plus the
assistant's generation prompt; a string is one user turn. With False a string is tokenised verbatim with no
special tokens added (a prompt you rendered yourself), and chat-message prompts are refused at load time.

A bad row raises DataError naming the file and its line (JSONL, from 1) or row (Parquet and `datasets`, from 0,
as in `ds[i]`) before any work starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class PromptRow:
    prompt: str | list[dict]  # text, or chat messages
    label: str
    index: int  # position among the rows, 0-based
    metadata: dict = field(default_factory=dict)
    tools: list[dict] | None = None


@dataclass(frozen=True)
class DataKeys:
    prompt: str = "prompt"
    label: str = "label"
    metadata: str = "metadata"
    tools: str = "tools"


class DataError(ValueError):
    """A prompt file that cannot be used; the message names the file and line (or row)."""


def load_prompts(
    path: str | Path,
    prompt_key: str = "prompt",
    label_key: str = "label",
    *,
    metadata_key: str = "metadata",
    tool_key: str = "tools",
    apply_chat_template: bool = True,
    split: str | None = None,
) -> list[PromptRow]:
    """Every row of a JSONL file, a Parquet file or a `datasets` directory (`split` picks one of a DatasetDict's
    splits; a single split is taken as is)."""
    path, keys = Path(path), DataKeys(prompt_key, label_key, metadata_key, tool_key)
    if path.is_dir():
        records = _datasets_records(path, split)
    elif not path.is_file():
        raise DataError(f"{path}: prompt file not found")
    elif path.suffix.lower() in PARQUET_SUFFIXES:
        records = _parquet_records(path)
    else:
        records = _jsonl_records(path)
    rows = [_row(obj, where, keys, i, apply_chat_template) for i, (where, obj) in enumerate(records)]
    if not rows:
        raise DataError(f"{path}: no prompt rows")
    return rows


def prompt_ids(
    tokenizer, prompt: str | list[dict], *, tools: list[dict] | None = None, apply_chat_template: bool = True
) -> list[int]:
    """Token ids of a prompt as the engine gets it (see the module docstring for the two modes)."""
    if not apply_chat_template:
        if not isinstance(prompt, str):
            raise DataError("chat-message prompts need the chat template (apply_chat_template=True)")
        return tokenizer.encode(prompt, add_special_tokens=False)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False, **kwargs
    )


# -- readers: (where, record) per row ------------------------------------------------------------------------
def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None


def _parquet_records(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several kinds for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    for i, obj in enumerate(records):
        yield f"{path}: row {i}", obj


def _datasets_records(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        raise DataError(
            f"{path}: a directory, but not one saved by datasets' save_to_disk (no dataset_dict.json or state.json)"
        )
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: a `datasets` directory needs the datasets package (pip install datasets)") from None
    ds = datasets.load_from_disk(str(path))
    where = str(path)
    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) == 1:
            split = next(iter(ds))
        if split not in ds:
            raise DataError(f"{path}: choose a split with split=… (has: {', '.join(ds)})")
        ds, where = ds[split], f"{path} (split {split})"
    elif split is not None:
        raise DataError(f"{path}: holds one Dataset, not splits; drop split={split!r}")
    for i, obj in enumerate(ds):
        yield f"{where}: row {i}", obj


# -- one row ----------------------------------------------------------------------------------------------------
_MISSING = object()


def _get(obj: dict, key: str) -> Any:
    """obj[key], or a dotted path into nested objects; _MISSING when absent."""
    if key in obj:
        return obj[key]
    value: Any = obj
    for part in key.split(".") if "." in key else [key]:
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _row(obj: Any, where: str, keys: DataKeys, index: int, apply_chat_template: bool) -> PromptRow:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in (keys.prompt, keys.label):
        if _get(obj, key) is _MISSING:
            raise DataError(f"{where}: missing field {key!r} (fields present: {sorted(obj)})")
    prompt = _prompt(_get(obj, keys.prompt), where, keys.prompt, apply_chat_template)
    return PromptRow(
        prompt=prompt,
        label=_label(_get(obj, keys.label), where, keys.label),
        index=index,
        metadata=_metadata(_get(obj, keys.metadata), where, keys.metadata),
        tools=_tools(_get(obj, keys.tools), where, keys.tools),
    )


def _prompt(value: Any, where: str, key: str, apply_chat_template: bool) -> str | list[dict]:
    if isinstance(value, str):
        if not value:
            raise DataError(f"{where}: field {key!r} must be a non-empty string or a list of chat messages")
        return value
    if not isinstance(value, list):
        raise DataError(
            f"{where}: field {key!r} must be a non-empty string or a list of chat messages, got {type(value).__name__}"
        )
    if not apply_chat_template:
        raise DataError(
            f"{where}: field {key!r} is a list of chat messages; those need the chat template (--apply-chat-template)"
        )
    if not value:
        raise DataError(f"{where}: field {key!r} is an empty list of chat messages")
    messages = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise DataError(f"{where}: {key}[{j}] must be a chat message {{'role': …, 'content': …}}, got {m!r:.80}")
        if not isinstance(m["content"], str | list | None):
            raise DataError(f"{where}: {key}[{j}].content must be a string, got {type(m['content']).__name__}")
        # Parquet fills fields that other rows' messages have (tool_calls, …) with null: drop those
        messages.append({k: v for k, v in m.items() if v is not None or k == "content"})
    return messages


def _label(value: Any, where: str, key: str) -> str:
    if value is None:
        raise DataError(f"{where}: field {key!r} is null")
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def _json_field(value: Any, where: str, key: str, kind: type, default: Any) -> Any:
    if value is _MISSING or value is None:
        return default
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else default
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: field {key!r} is a string but not JSON ({e.msg})") from None
    if not isinstance(value, kind):
        raise DataError(
            f"{where}: field {key!r} must be a {'JSON object' if kind is dict else 'list'}, got {type(value).__name__}"
        )
    return value


def _metadata(value: Any, where: str, key: str) -> dict:
    return _json_field(value, where, key, dict, {})


def _tools(value: Any, where: str, key: str) -> list[dict] | None:
    return _json_field(value, where, key, list, None)
