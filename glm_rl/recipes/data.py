"""Recipe data: pretraining text and SFT chats, tokenised and packed into fixed-length rows.

- Pretrain: JSONL (one JSON object a line) with raw text under `text_key`, or already tokenized `input_ids`;
  Parquet goes through HF `datasets` (in the `test` and `recipes` extras; a clear error without it).
  Every document gets EOS appended; documents are concatenated and cut into rows of `seq_length + 1` tokens
  (inputs = row[:-1], targets = row[1:]), Megatron's GPT dataset packing. Loss on every target.
- SFT: JSONL with `messages` (role / content), rendered by the model's own chat template. Loss only on the
  assistant turns: the tokens between the prompt rendered up to that turn (with the generation prompt) and the
  prompt rendered through it. Samples are packed greedily (first fit, in order) into rows of `seq_length`;
  a sample longer than a row is an error naming its line. Packed samples attend to each other (no
  per-document attention reset on the local spec), which is what short-sample packing commonly accepts.
Rows are dealt to data-parallel ranks round-robin, the same on every rank (seeded shuffle per epoch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class PackedRows:
    input_ids: torch.Tensor  # (N, S) long
    targets: torch.Tensor  # (N, S) long: next token of each position
    loss_mask: torch.Tensor  # (N, S) float: 1 where the target is trained on

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def read_records(path: str | Path) -> list[dict]:
    """Rows of a JSONL file (or Parquet, via HF `datasets`); errors name the file and line."""
    path = Path(path)
    if path.suffix == ".parquet":
        try:
            import datasets
        except ImportError:
            raise ValueError(
                f"data.path {path}: Parquet needs HF `datasets` (pip install datasets); or convert it to JSONL"
            ) from None
        return list(datasets.load_dataset("parquet", data_files=str(path), split="train"))
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
    return rows


def pack_pretrain(records: list[dict], tokenizer, seq_length: int, text_key: str = "text") -> PackedRows:
    stream: list[int] = []
    for i, r in enumerate(records, 1):
        if "input_ids" in r:
            ids = list(r["input_ids"])
        elif text_key in r:
            ids = tokenizer.encode(r[text_key], add_special_tokens=False)
        else:
            raise ValueError(f"pretrain record {i}: needs {text_key!r} (raw text) or 'input_ids' (tokenized)")
        stream += ids + [tokenizer.eos_token_id]
    n = (len(stream) - 1) // seq_length
    if n < 1:
        raise ValueError(
            f"pretrain data has {len(stream)} tokens, fewer than one row of data.seq_length {seq_length} + 1"
        )
    ids = torch.tensor(stream[: n * seq_length + 1])
    return PackedRows(ids[:-1].view(n, seq_length), ids[1:].view(n, seq_length), torch.ones(n, seq_length))


def chat_tokens(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, mask): the conversation through the chat template, mask 1 on assistant-turn tokens (incl. the
    end-of-turn token the template writes) — the prefix trick needs only the template, no token offsets."""

    def render(msgs, gen):
        out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    ids = render(messages, False)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        start, end = len(render(messages[:i], True)), len(render(messages[: i + 1], False))
        if ids[:end] != render(messages[: i + 1], False):
            raise ValueError("chat template is not prefix-stable; cannot find assistant tokens")
        mask[start:end] = [1] * (end - start)
    return ids, mask


def pack_sft(records: list[dict], tokenizer, seq_length: int) -> PackedRows:
    samples = []
    for i, r in enumerate(records, 1):
        if not isinstance(r.get("messages"), list):
            raise ValueError(f"sft record {i}: needs 'messages', a list of {{role, content}}")
        ids, mask = chat_tokens(tokenizer, r["messages"])
        if len(ids) > seq_length + 1:
            raise ValueError(f"sft record {i}: {len(ids)} tokens do not fit data.seq_length {seq_length}")
        samples.append((ids, mask))
    rows: list[tuple[list[int], list[int]]] = []
    for ids, mask in samples:  # first fit, each row holds <= seq_length + 1 tokens (inputs + last target)
        for row in rows:
            if len(row[0]) + len(ids) <= seq_length + 1:
                row[0].extend(ids), row[1].extend(mask)
                break
        else:
            rows.append((list(ids), list(mask)))
    pad = tokenizer.pad_token_id
    n = len(rows)
    input_ids = torch.full((n, seq_length), pad, dtype=torch.long)
    targets = torch.full((n, seq_length), pad, dtype=torch.long)
    loss_mask = torch.zeros(n, seq_length)
    for k, (ids, mask) in enumerate(rows):
        t = len(ids) - 1
        input_ids[k, :t] = torch.tensor(ids[:-1])
        targets[k, :t] = torch.tensor(ids[1:])
        loss_mask[k, :t] = torch.tensor(mask[1:], dtype=torch.float)  # target j+1 trained iff it is assistant
    return PackedRows(input_ids, targets, loss_mask)


def load_rows(kind: str, path: str | Path, tokenizer, seq_length: int, text_key: str = "text") -> PackedRows:
    records = read_records(path)
    if not records:
        raise ValueError(f"data.path {path}: no records")
    return (
        pack_pretrain(records, tokenizer, seq_length, text_key)
        if kind == "pretrain"
        else pack_sft(records, tokenizer, seq_length)
    )


def batch_indices(n_rows: int, step: int, global_batch: int, dp_rank: int, dp_size: int, seed: int) -> list[int]:
    """Row indices this DP rank trains on at `step`: a seeded permutation per epoch, global batch dealt
    round-robin over DP ranks (every rank computes the same permutation)."""
    out, start = [], step * global_batch
    for k in range(start + dp_rank, start + global_batch, dp_size):
        epoch, pos = divmod(k, n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(int(perm[pos]))
    return out
