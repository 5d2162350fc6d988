"""Batched generation over the HF GLM-4.5 model: the math behind the embedded engine.

Why a module of its own: `run_batch` is a pure function of (model, requests) — no threads, no HTTP — so it
can be read and tested apart from the engine's scheduling.

- Left padding + attention mask + position ids (cumsum of the mask) for the prefill, then one token per row per
  step with an HF `DynamicCache`; rows that finish are dropped from the cache (`batch_select_indices`).
  Tensors and the per-request generators live on `model.device` (CPU here; CUDA in benchmarks/).
- Per-request sampling: temperature (0 = greedy), top-k (<= 0: off), top-p, from a per-request
  `torch.Generator` seeded by `request_seed(engine seed, key)`. The logprob returned for a token is
  log_softmax(logits / T) at it, before top-k / top-p filtering (T = 1 for greedy).
- Stop on any stop id (the model's eos ids unless ignore_eos, plus stop_token_ids); the stop token is kept.
- Routed experts: forward hooks on the MoE routers (`mlp.gate`, whose forward returns (logits, weights,
  top-k indices)) give [B, S, n_moe, top_k] per forward; each row keeps its own non-pad positions, so a row
  ends with prompt_len + completion_len - 1 entries (its last token is never fed back).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from transformers import DynamicCache


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                    # <= 0: disabled
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True


@dataclass(frozen=True)
class GenerationRequest:
    rid: str
    input_ids: tuple[int, ...]
    sampling: SamplingParams
    seed: int                          # seeds this request's torch.Generator
    return_logprob: bool = False
    return_routed_experts: bool = False


@dataclass
class Row:
    """Decoding state of one request inside a batch (and, finished, its result)."""

    req: GenerationRequest
    stop_ids: frozenset[int]
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    routed: list[torch.Tensor] = field(default_factory=list)
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


def request_seed(engine_seed: int, key: object) -> int:
    """A 63-bit seed from (engine seed, key): the same key always samples the same way."""
    digest = hashlib.sha256(f"{engine_seed}:{key!r}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class _RouterCapture:
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


def _filter_logits(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering along the last dim of [..., V] logits: dropped ids get -inf."""
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = (torch.cumsum(probs, dim=-1) - probs) > top_p  # keep the smallest prefix reaching top_p
        scaled = scaled.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return scaled


def _sample_group(logits: torch.Tensor, sp: SamplingParams, generators: list[torch.Generator]):
    """(tokens [n], logprobs [n]) for n rows sharing sampling params: the logprob is log_softmax(logits / T) at
    the token (T = 1 for greedy). Filtering and softmax run batched; each row still draws from its own
    generator, so a request's tokens do not depend on which other requests share its batch."""
    if sp.temperature <= 0.0:
        tokens = torch.argmax(logits, dim=-1)
        return tokens, torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    scaled = logits / sp.temperature
    probs = torch.softmax(_filter_logits(scaled, sp.top_k, sp.top_p), dim=-1)
    tokens = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])
    return tokens, torch.log_softmax(scaled, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)


def _step_rows(rows: list[Row], active: list[int], logits: torch.Tensor) -> None:
    """Sample one token for every active row and mark the rows that finish. Rows are grouped by sampling
    params (one group in RL: every request alike) and the results cross to the host once per step."""
    logits = logits.float()
    groups: dict[tuple, list[int]] = {}
    for b, i in enumerate(active):
        sp = rows[i].req.sampling
        groups.setdefault((sp.temperature, sp.top_k, sp.top_p), []).append(b)
    tokens = torch.empty(len(active), dtype=torch.long, device=logits.device)
    logps = torch.empty(len(active), dtype=torch.float32, device=logits.device)
    for bs in groups.values():
        index = torch.tensor(bs, device=logits.device)
        t, lp = _sample_group(logits[index], rows[active[bs[0]]].req.sampling,
                              [rows[active[b]].generator for b in bs])
        tokens[index], logps[index] = t, lp
    for i, token, logp in zip(active, tokens.tolist(), logps.tolist()):
        rows[i].emit(token, logp)


def _prefill(model, rows: list[Row], pad_id: int, cache: DynamicCache, capture: _RouterCapture | None):
    lengths = [len(r.req.input_ids) for r in rows]
    width, dev = max(lengths), model.device
    ids = torch.tensor([[pad_id] * (width - n) + list(r.req.input_ids) for r, n in zip(rows, lengths)], device=dev)
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], device=dev)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    if capture is not None:
        routed = capture.pop()
        for b, (row, n) in enumerate(zip(rows, lengths)):
            row.routed.append(routed[b, width - n:])
    return out.logits[:, -1], mask


def _decode(model, rows: list[Row], active: list[int], cache: DynamicCache, mask: torch.Tensor,
            capture: _RouterCapture | None):
    ids = torch.tensor([[rows[i].output_ids[-1]] for i in active], device=mask.device)
    positions = torch.tensor([[len(rows[i].req.input_ids) + len(rows[i].output_ids) - 1] for i in active],
                             device=mask.device)
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    if capture is not None:
        routed = capture.pop()
        for b, i in enumerate(active):
            rows[i].routed.append(routed[b])
    return out.logits[:, -1], mask


@torch.no_grad()
def run_batch(model, requests: list[GenerationRequest], *, eos_ids: Iterable[int], pad_id: int,
              gates: list[torch.nn.Module], should_abort: Callable[[], bool]) -> list[Row]:
    """Generate for every request in one batch; rows come back finished (stop / length / abort)."""
    eos = frozenset(eos_ids)
    rows = [Row(r, frozenset(r.sampling.stop_token_ids) | (frozenset() if r.sampling.ignore_eos else eos),
                 torch.Generator(device=model.device).manual_seed(r.seed)) for r in requests]
    capture = _RouterCapture(gates) if any(r.return_routed_experts for r in requests) else None
    cache = DynamicCache(config=model.config)
    try:
        logits, mask = _prefill(model, rows, pad_id, cache, capture)
        active = list(range(len(rows)))
        while True:
            _step_rows(rows, active, logits)
            keep = [b for b, i in enumerate(active) if rows[i].finish is None]
            if keep and should_abort():
                for b in keep:
                    rows[active[b]].finish = {"type": "abort", "message": "aborted by pause_generation"}
                keep = []
            if not keep:
                return rows
            if len(keep) < len(active):
                cache.batch_select_indices(torch.tensor(keep, device=mask.device))
                mask, active = mask[keep], [active[b] for b in keep]
            logits, mask = _decode(model, rows, active, cache, mask, capture)
    finally:
        if capture is not None:
            capture.remove()
