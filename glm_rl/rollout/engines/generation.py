"""Batched generation over the HF GLM-4.5 model: the math behind the embedded engine.

Why a module of its own: `run_batch` is a pure function of (model, requests) — no threads, no HTTP — so it
can be read and tested apart from the engine's scheduling.

- With a `StaticDecoder` (static_decode.py, the engine's default) the batch runs over its preallocated KV cache,
  CUDA-graphed on GPU. Without one: left padding + attention mask + position ids (cumsum of the mask) for the
  prefill, then one token per row per step with an HF `DynamicCache`; rows that finish are dropped from the
  cache (`batch_select_indices`). Both paths sample and stop through the same code below.
  Tensors and the per-request generators live on `model.device` (CPU here; CUDA in benchmarks/).
- Per-request sampling: temperature (0 = greedy), top-k (<= 0: off), top-p; inverse-CDF at a counter-based
  uniform keyed by (request seed = `request_seed(engine seed, key)`, decode step), batched over the rows.
  Each row also carries a `torch.Generator` from the same seed for speculative decoding's accept / reject
  draws. The logprob returned for a token is log_softmax(logits / T) at it, before top-k / top-p filtering
  (T = 1 for greedy).
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


_M64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """splitmix64's finaliser."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def counter_uniform(seed: int, step: int) -> float:
    """A uniform in (0, 1) from (request seed, decode step) — counter-based: a request's draw depends on nothing
    but its own seed and step (not on its batch, nor on how many draws came before). Host side: a batch's
    uniforms cost one small copy to the device instead of a chain of tiny integer kernels."""
    x = _mix64((_mix64((seed * 0xD1B54A32D192ED03 + step) & _M64) + 0x9E3779B97F4A7C15) & _M64)
    return ((x >> 11) + 0.5) / float(1 << 53)


def _sample_group(logits: torch.Tensor, sp: SamplingParams, uniforms: list[float]):
    """(tokens [n], logprobs [n]) for n rows sharing sampling params: the logprob is log_softmax(logits / T) at
    the token (T = 1 for greedy), in fp32. Sampling inverts each row's CDF of softmax(filtered logits / T)
    (accumulated in float64, so the smallest probabilities keep their mass) at the row's uniform: the batch
    samples in a handful of kernels, and a request's tokens do not depend on which other requests share it."""
    scaled = logits.float()
    if sp.temperature > 0.0 and sp.temperature != 1.0:
        scaled = scaled / sp.temperature
    logp = torch.log_softmax(scaled, dim=-1)
    if sp.temperature <= 0.0:
        tokens = torch.argmax(scaled, dim=-1)
    else:
        filtered = _filter_logits(scaled, sp.top_k, sp.top_p)
        probs = logp.exp() if filtered is scaled else torch.softmax(filtered, dim=-1)
        cdf = probs.to(torch.float64).cumsum_(-1)
        target = torch.tensor(uniforms, dtype=torch.float64).to(cdf.device, non_blocking=True)[:, None] * cdf[:, -1:]
        # the first index whose CDF reaches u: never a zero-probability token (its CDF equals its predecessor's)
        tokens = torch.searchsorted(cdf, target).squeeze(-1).clamp_max_(logits.shape[-1] - 1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def _step_rows(rows: list[Row], active: list[int], logits: torch.Tensor) -> None:
    """Sample one token for every active row and mark the rows that finish. Rows are grouped by sampling
    params (one group in RL: every request alike) and the results cross to the host once per step."""
    groups: dict[tuple, list[int]] = {}
    for b, i in enumerate(active):
        sp = rows[i].req.sampling
        groups.setdefault((sp.temperature, sp.top_k, sp.top_p), []).append(b)
    dev = logits.device
    uniforms = [counter_uniform(rows[i].req.seed, len(rows[i].output_ids)) for i in active]
    if len(groups) == 1:  # the RL case: the whole batch samples alike, no gather of logits rows
        tokens, logps = _sample_group(logits, rows[active[0]].req.sampling, uniforms)
    else:
        tokens = torch.empty(len(active), dtype=torch.long, device=dev)
        logps = torch.empty(len(active), dtype=torch.float32, device=dev)
        for bs in groups.values():
            index = torch.tensor(bs, device=dev)
            tokens[index], logps[index] = _sample_group(logits[index], rows[active[bs[0]]].req.sampling,
                                                        [uniforms[b] for b in bs])
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


def _survivors(rows: list[Row], active: list[int], should_abort: Callable[[], bool]) -> list[int]:
    """Batch indices (into `active`) of the rows still decoding; all rows are aborted if `should_abort()`."""
    keep = [b for b, i in enumerate(active) if rows[i].finish is None]
    if keep and should_abort():
        for b in keep:
            rows[active[b]].finish = {"type": "abort", "message": "aborted by pause_generation"}
        keep = []
    return keep


def new_rows(model, requests: list[GenerationRequest], eos_ids: Iterable[int], row_type: type = Row) -> list:
    """One decoding row per request: its stop ids (eos unless ignore_eos, plus stop_token_ids) and generator."""
    eos = frozenset(eos_ids)
    return [row_type(r, frozenset(r.sampling.stop_token_ids) | (frozenset() if r.sampling.ignore_eos else eos),
                torch.Generator(device=model.device).manual_seed(r.seed)) for r in requests]


def _loop(rows: list[Row], steps, should_abort: Callable[[], bool]) -> list[Row]:
    """Sample, stop and step until every row finished: `steps.first()` gives the prefill's logits,
    `steps.next(active, keep)` drops the finished rows (`keep` indexes `active`) and decodes one more token."""
    active, logits = list(range(len(rows))), steps.first()
    while True:
        _step_rows(rows, active, logits)
        keep = _survivors(rows, active, should_abort)
        if not keep:
            return rows
        logits = steps.next(active, keep)
        active = [active[b] for b in keep]


@torch.no_grad()
def run_batch(model, requests: list[GenerationRequest], *, eos_ids: Iterable[int], pad_id: int,
              gates: list[torch.nn.Module], should_abort: Callable[[], bool], decoder=None) -> list[Row]:
    """Generate for every request in one batch; rows come back finished (stop / length / abort). With a
    `StaticDecoder` (static_decode.py) the batch runs over its preallocated cache, else over a DynamicCache."""
    rows = new_rows(model, requests, eos_ids)
    if decoder is not None:
        return _loop(rows, _StaticSteps(decoder, rows, pad_id), should_abort)
    capture = _RouterCapture(gates) if any(r.return_routed_experts for r in requests) else None
    try:
        return _loop(rows, _DynamicSteps(model, rows, pad_id, capture), should_abort)
    finally:
        if capture is not None:
            capture.remove()


class _DynamicSteps:
    """Decode steps over an HF DynamicCache (left-padded prefill; finished rows dropped from the cache)."""

    def __init__(self, model, rows: list[Row], pad_id: int, capture: _RouterCapture | None) -> None:
        self.model, self.rows, self.pad_id, self.capture = model, rows, pad_id, capture
        self.cache = DynamicCache(config=model.config)

    def first(self) -> torch.Tensor:
        logits, self.mask = _prefill(self.model, self.rows, self.pad_id, self.cache, self.capture)
        return logits

    def next(self, active: list[int], keep: list[int]) -> torch.Tensor:
        if len(keep) < len(active):
            self.cache.batch_select_indices(torch.tensor(keep, device=self.mask.device))
            self.mask = self.mask[keep]
        logits, self.mask = _decode(self.model, self.rows, [active[b] for b in keep], self.cache, self.mask,
                                    self.capture)
        return logits


class _StaticSteps:
    """Decode steps over a StaticDecoder: live rows are cache rows 0..n-1 (compacted when rows finish)."""

    def __init__(self, decoder, rows: list[Row], pad_id: int) -> None:
        self.decoder, self.rows, self.pad_id = decoder, rows, pad_id
        self.want_routed = any(r.req.return_routed_experts for r in rows)

    def first(self) -> torch.Tensor:
        rows = self.rows
        self.decoder.reserve(max(len(r.req.input_ids) + r.req.sampling.max_new_tokens for r in rows))
        logits, routed = self.decoder.prefill([r.req.input_ids for r in rows], self.pad_id)
        if self.want_routed:
            for b, row in enumerate(rows):
                row.routed.append(routed[b, :len(row.req.input_ids)])
        return logits

    def next(self, active: list[int], keep: list[int]) -> torch.Tensor:
        live = [self.rows[active[b]] for b in keep]
        fed = [len(r.req.input_ids) + len(r.output_ids) - 1 for r in live]  # each row's next position
        if len(keep) < len(active):
            self.decoder.compact(keep, span=max(fed))  # slots below each row's next position are written
        logits, routed = self.decoder.decode([r.output_ids[-1] for r in live], fed)
        if self.want_routed:
            routed = routed.clone()  # the graph's output buffer is rewritten by the next step
            for b, row in enumerate(live):
                row.routed.append(routed[b])
        return logits
