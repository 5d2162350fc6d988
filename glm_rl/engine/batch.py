"""One batch of requests as the decode loops see it: requests, per-row state, and the host-side bookkeeping they
all share.

Why a module of its own: every decode path (`decode/`: DynamicCache or static cache, plain or speculative) reads
and writes the same rows the same way, and the engine turns the same rows into answers; none of this touches the
model.
- `SamplingParams`, `GenerationRequest`: a validated request (`http_parse.py` builds them from JSON); its seed
  is `request_seed(engine seed, key)`, so the same key always samples the same way.
- `Row` (a request's decoding state and result), `SpecRow` (+ SGLang's speculation counters, summed into the
  engine's stats by `accumulate_stats`); `new_rows` makes them: stop ids (eos unless ignore_eos, plus
  stop_token_ids; the stop token is kept) and a `torch.Generator` from the request seed, for speculative
  decoding's accept / reject draws.
- `HostCopy`: per-row values on their way to the host, copied without blocking so the host can queue the next
  step first; `emit_rows` appends them; `survivors` stops finished rows (all of them on abort).
- `RouterCapture`: forward hooks on the MoE routers (`mlp.gate`, whose forward returns (logits, weights,
  top-k indices)) give [B, S, n_moe, top_k] per forward; each row keeps its own non-pad positions, so a row
  ends with prompt_len + completion_len - 1 entries (its last token is never fed back).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # <= 0: disabled
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True


@dataclass(frozen=True)
class GenerationRequest:
    rid: str
    input_ids: tuple[int, ...]
    sampling: SamplingParams
    seed: int  # seeds this request's torch.Generator
    return_logprob: bool = False
    return_routed_experts: bool = False


def request_seed(engine_seed: int, key: object) -> int:
    """A 63-bit seed from (engine seed, key): the same key always samples the same way."""
    digest = hashlib.sha256(f"{engine_seed}:{key!r}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class Row:
    """Decoding state of one request inside a batch (and, finished, its result)."""

    req: GenerationRequest
    stop_ids: frozenset[int]
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    routed: list[torch.Tensor] = field(default_factory=list)  # concatenated: [positions, n_moe, top_k]
    finish: dict[str, Any] | None = None

    def emit(self, token: int, logprob: float) -> bool:
        """Append one sampled token; mark the row finished on a stop id or max_new_tokens. True if finished."""
        self.output_ids.append(token)
        self.logprobs.append(logprob)
        if token in self.stop_ids:
            self.finish = {"type": "stop", "matched": token}
        elif len(self.output_ids) >= self.req.sampling.max_new_tokens:
            self.finish = {"type": "length", "length": len(self.output_ids)}
        return self.finish is not None


@dataclass
class SpecRow(Row):
    """A `Row` with SGLang's speculation counters."""

    verify_ct: int = 0  # verify forwards this request took part in
    draft_tokens: int = 0  # drafts proposed (k per verify)
    accepted_tokens: int = 0  # drafts the acceptance rule kept

    def spec_meta(self) -> dict[str, Any]:
        n = len(self.output_ids)
        return {
            "spec_verify_ct": self.verify_ct,
            "spec_draft_token_num": self.draft_tokens,
            "spec_accept_token_num": self.accepted_tokens,
            "spec_accept_length": n / self.verify_ct if self.verify_ct else float(n > 0),
        }


def accumulate_stats(stats: dict[str, Any], rows: Iterable[Row]) -> None:
    """Add the rows' speculation counters to the engine's stats (and the running acceptance length)."""
    for row in rows:
        if isinstance(row, SpecRow):
            stats["spec_verify_ct"] = stats.get("spec_verify_ct", 0) + row.verify_ct
            stats["spec_draft_tokens"] = stats.get("spec_draft_tokens", 0) + row.draft_tokens
            stats["spec_accept_tokens"] = stats.get("spec_accept_tokens", 0) + row.accepted_tokens
            stats["spec_completion_tokens"] = stats.get("spec_completion_tokens", 0) + len(row.output_ids)
    if stats.get("spec_verify_ct"):
        stats["avg_spec_accept_length"] = stats["spec_completion_tokens"] / stats["spec_verify_ct"]


def new_rows(model, requests: list[GenerationRequest], eos_ids: Iterable[int], row_type: type = Row) -> list:
    """One decoding row per request: its stop ids (eos unless ignore_eos, plus stop_token_ids) and generator."""
    eos = frozenset(eos_ids)
    return [
        row_type(
            r,
            frozenset(r.sampling.stop_token_ids) | (frozenset() if r.sampling.ignore_eos else eos),
            torch.Generator(device=model.device).manual_seed(r.seed),
        )
        for r in requests
    ]


class HostCopy:
    """Per-row values on their way to the host: the columns (each [n] or [n, m]) are packed as float64 (token
    ids < 2^53 are exact) and the copy starts at construction; `rows()` waits for it. So the host can queue the
    next decode step on the GPU before it waits for this one's results."""

    def __init__(self, *columns: torch.Tensor) -> None:
        table = torch.cat([c.reshape(c.shape[0], -1).to(torch.float64) for c in columns], dim=1)
        self.done = None
        if table.is_cuda:
            self.host = torch.empty(table.shape, dtype=table.dtype, pin_memory=True)
            self.host.copy_(table, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.host = table

    def rows(self) -> list[list[float]]:
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()


def emit_rows(rows: list[Row], active: list[int], fetched: HostCopy) -> None:
    """Append each active row's token and logprob (`fetched`: their HostCopy) and mark the rows that finish."""
    for i, (token, logp) in zip(active, fetched.rows()):
        rows[i].emit(int(token), logp)


def emit_tokens(row: Row, tokens: list[int], logprobs: list[float]) -> int:
    """Append tokens until the row finishes (stop id / max_new_tokens); returns how many were kept."""
    for n, (token, logprob) in enumerate(zip(tokens, logprobs), start=1):
        if row.emit(token, logprob):
            return n
    return len(tokens)


def survivors(rows: list[Row], active: list[int], should_abort: Callable[[], Any]) -> list[int]:
    """Batch indices (into `active`) of the rows still decoding. `should_abort()` True aborts every row
    (pause_generation); a collection of rids aborts those rows only (/abort_request)."""
    keep = [b for b, i in enumerate(active) if rows[i].finish is None]
    verdict = should_abort() if keep else False
    if verdict:
        for b in keep:
            if verdict is True or rows[active[b]].req.rid in verdict:
                rows[active[b]].finish = {"type": "abort", "message": "aborted"}
        keep = [b for b in keep if rows[active[b]].finish is None]
    return keep


class RoutedLog:
    """A batch's routed experts as the static decoder produces them: one device tensor per forward (sorted per
    position, int16) with the rows it covers, moved to the host in ONE copy when the batch ends (`finish`), each
    row's positions then cut out on the host. Why: appending per-row slices every step costs a Python op per row
    per step (512 rows x 128 steps), and copying each row to the host at answer time one synchronisation per row."""

    def __init__(self) -> None:
        self._parts: list[tuple[np.ndarray, torch.Tensor, np.ndarray | None]] = []

    def add(self, row_ids: Sequence[int], routed: torch.Tensor, counts: Sequence[int] | None = None) -> int:
        """Routed experts [n, S, n_moe, top_k] of one forward: row b of `routed` is batch row `row_ids[b]`, its
        first `counts[b]` positions valid (all S when None; `set_counts` may give them later). Queued on the
        device, nothing waits; the caller may reuse `routed` (a graph's buffer) afterwards. Returns the part's
        index."""
        ids = routed.sort(dim=-1).values.to(torch.int16)
        self._parts.append((np.asarray(row_ids, dtype=np.int64), ids, None))
        if counts is not None:
            self.set_counts(len(self._parts) - 1, counts)
        return len(self._parts) - 1

    def set_counts(self, part: int, counts: Sequence[int]) -> None:
        """How many leading positions of each row of part `part` are valid (known once the host read the step)."""
        row_ids, ids, _ = self._parts[part]
        self._parts[part] = (row_ids, ids, np.asarray(counts, dtype=np.int64))

    def finish(self, rows: list[Row]) -> None:
        """Give each row its positions, in the order they were added: `row.routed` = [host tensor [L, n_moe,
        top_k]] (or [] if it has none)."""
        if not self._parts:
            return
        flat = torch.cat([ids.flatten(0, 1) for _, ids, _ in self._parts]).cpu()
        owner, keep = [], []
        for row_ids, ids, counts in self._parts:
            n, S = ids.shape[:2]
            owner.append(np.repeat(row_ids, S))
            valid = np.arange(S)[None, :] < (np.full(n, S) if counts is None else counts)[:, None]
            keep.append(valid.reshape(-1))
        owner, keep = np.concatenate(owner), np.concatenate(keep)
        owner = owner[keep]
        order = np.flatnonzero(keep)[np.argsort(owner, kind="stable")]  # by row, then in the order added
        per_row = np.bincount(owner, minlength=len(rows)).tolist()
        for row, part in zip(rows, torch.split(flat[torch.from_numpy(order)], per_row)):
            row.routed = [part] if len(part) else []
        self._parts = []


class RouterCapture:
    """Forward hooks on the MoE routers: each forward yields [B, S, n_moe, top_k] expert ids."""

    def __init__(self, gates: list[torch.nn.Module]) -> None:
        self._step: list[torch.Tensor] = []
        self._handles = [g.register_forward_hook(self._hook) for g in gates]

    def _hook(self, module, args, output) -> None:
        batch, seq = args[0].shape[:2]
        self._step.append(output[2].detach().view(batch, seq, -1))

    def pop(self) -> torch.Tensor:
        step, self._step = self._step, []
        return torch.stack(step, dim=2)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
