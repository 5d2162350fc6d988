"""Batched generation over the HF GLM-4.5 model: the math behind the embedded engine.

Why a module of its own: `run_batch` is a pure function of (model, requests) — no threads, no HTTP — so it
can be read and tested apart from the engine's scheduling.

- With a `StaticDecoder` (static_decode.py, the engine's default) the batch runs over its preallocated KV cache,
  CUDA-graphed on GPU. Without one: left padding + attention mask + position ids (cumsum of the mask) for the
  prefill, then one token per row per step with an HF `DynamicCache`; rows that finish are dropped from the
  cache (`batch_select_indices`). Both paths sample and stop through the same code below; over the static
  cache, when the rows share sampling params, the sampler runs inside the decode step and the next step is
  queued before the host reads the last one's tokens (`_loop`, `_StaticSteps.ahead`).
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

import numpy as np
import torch
import torch.nn.functional as F
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


def counter_bits(seed: int, step: int) -> int:
    """53 random bits from (request seed, decode step) — counter-based: a request's draw depends on nothing but its
    own seed and step (not on its batch, nor on how many draws came before). Computed on the host: a batch's bits
    cross to the device in the same copy as its tokens, instead of a chain of tiny integer kernels."""
    return _mix64((_mix64((seed * 0xD1B54A32D192ED03 + step) & _M64) + 0x9E3779B97F4A7C15) & _M64) >> 11


def counter_bits_many(seeds: list[int], steps: list[int]) -> np.ndarray:
    """`counter_bits` of each (seed, step) pair as an int64 array, in a dozen numpy operations instead of a Python
    loop per row (uint64 arithmetic wraps modulo 2^64, as the masks above do)."""
    def mix(z):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    x = np.array(seeds, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03) + np.array(steps, dtype=np.uint64)
    return (mix(mix(x) + np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(11)).astype(np.int64)


def counter_uniform(seed: int, step: int) -> float:
    """The uniform in (0, 1) of (seed, step): `bits_to_uniform` of `counter_bits`, on the host."""
    return (counter_bits(seed, step) + 0.5) / float(1 << 53)


def bits_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """`counter_uniform` on the device, from int64 `counter_bits`: the same float64 value, bit for bit (the bits fit
    a float64 exactly, and both sides round `bits + 0.5` the same IEEE way; 2^-53 scales exactly)."""
    return (bits.to(torch.float64) + 0.5) * 2.0 ** -53


def sample_tokens(logits: torch.Tensor, sp: SamplingParams, uniforms: torch.Tensor):
    """(tokens [n], logprobs [n]) for n rows sharing sampling params, each row drawn at its uniform (float64 [n]):
    the logprob is log_softmax(logits / T) at the token (T = 1 for greedy), in fp32. Sampling inverts each row's
    CDF of softmax(filtered logits / T) (accumulated in float64, so the smallest probabilities keep their mass)
    at the row's uniform: a handful of kernels with no host synchronisation (so a CUDA graph can hold them,
    static_decode.py), and a request's tokens do not depend on which other requests share its batch."""
    scaled = logits.float()
    if sp.temperature > 0.0 and sp.temperature != 1.0:
        scaled = scaled / sp.temperature
    logp = torch.log_softmax(scaled, dim=-1)
    if sp.temperature <= 0.0:
        tokens = torch.argmax(scaled, dim=-1)
    else:
        filtered = _filter_logits(scaled, sp.top_k, sp.top_p)
        probs = logp.exp() if filtered is scaled else torch.softmax(filtered, dim=-1)
        cdf = _cdf(probs)
        target = uniforms.to(cdf.device, torch.float64, non_blocking=True)[:, None] * cdf[:, -1:]
        # the first index whose CDF reaches u: never a zero-probability token (its CDF equals its predecessor's)
        tokens = torch.searchsorted(cdf, target).squeeze(-1).clamp_max_(logits.shape[-1] - 1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


_CDF_BLOCK = 1024


def _cdf(probs: torch.Tensor) -> torch.Tensor:
    """float64 running sum along the last dim. A vocab-long row is scanned as blocks of 1024 plus one scan of the
    block totals: GPU scans parallelise over rows, and 64 rows of 151k entries scanned flat took 0.29 ms on an
    H100 (17 % of a graphed batch-64 decode step). Block b's offset is the inclusive scan of the totals up to
    b - 1, so a zero-probability entry starting a block repeats its predecessor's sum (never drawn, as in a flat
    scan)."""
    p = probs.to(torch.float64)
    V = p.shape[-1]
    if V <= 4 * _CDF_BLOCK:
        return p.cumsum_(-1)
    blocks = F.pad(p, (0, -V % _CDF_BLOCK)).unflatten(-1, (-1, _CDF_BLOCK)).cumsum_(-1)
    before = F.pad(blocks[..., :-1, -1].cumsum(-1), (1, 0))  # sum of all earlier blocks
    return (blocks + before[..., None]).flatten(-2)[..., :V]


def sampling_groups(rows: list[Row], active: list[int]) -> dict[tuple, list[int]]:
    """Batch indices (into `active`) grouped by sampling params (one group in RL: every request alike)."""
    groups: dict[tuple, list[int]] = {}
    for b, i in enumerate(active):
        sp = rows[i].req.sampling
        groups.setdefault((sp.temperature, sp.top_k, sp.top_p), []).append(b)
    return groups


def sample_rows(rows: list[Row], active: list[int], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, logprobs) on the device for every active row: one `sample_tokens` per sampling group."""
    groups = sampling_groups(rows, active)
    uniforms = bits_to_uniform(torch.from_numpy(counter_bits_many([rows[i].req.seed for i in active],
                                                                  [len(rows[i].output_ids) for i in active])))
    if len(groups) == 1:  # the RL case: no gather of logits rows
        return sample_tokens(logits, rows[active[0]].req.sampling, uniforms)
    tokens = torch.empty(len(active), dtype=torch.long, device=logits.device)
    logps = torch.empty(len(active), dtype=torch.float32, device=logits.device)
    for bs in groups.values():
        index = torch.tensor(bs, device=logits.device)
        tokens[index], logps[index] = sample_tokens(logits[index], rows[active[bs[0]]].req.sampling, uniforms[bs])
    return tokens, logps


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


def _step_rows(rows: list[Row], active: list[int], logits: torch.Tensor) -> None:
    """Sample one token for every active row and mark the rows that finish."""
    emit_rows(rows, active, HostCopy(*sample_rows(rows, active, logits)))


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
    """Emit, stop and step until every row finished. `steps.first()` gives the prefill's sampled (tokens,
    logprobs) on the device; `steps.ahead(active, out)` may queue the next step for every active row before the
    host has looked at `out` (the host's bookkeeping then overlaps the GPU's step); `steps.collect(active, keep,
    pending)` gives the next step's output for the rows `keep` (indexes into `active`) that did not finish:
    the queued step's rows, or a step run now."""
    active, out = list(range(len(rows))), steps.first()
    while True:
        fetched = HostCopy(*out)
        pending = steps.ahead(active, out)
        emit_rows(rows, active, fetched)
        keep = _survivors(rows, active, should_abort)
        if not keep:
            return rows
        out = steps.collect(active, keep, pending)
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
    """Decode steps over an HF DynamicCache (left-padded prefill; finished rows dropped from the cache); no run-
    ahead: the cache grows by concatenation, so every step waits for the host anyway."""

    def __init__(self, model, rows: list[Row], pad_id: int, capture: _RouterCapture | None) -> None:
        self.model, self.rows, self.pad_id, self.capture = model, rows, pad_id, capture
        self.cache = DynamicCache(config=model.config)

    def first(self) -> tuple[torch.Tensor, torch.Tensor]:
        logits, self.mask = _prefill(self.model, self.rows, self.pad_id, self.cache, self.capture)
        return sample_rows(self.rows, list(range(len(self.rows))), logits)

    def ahead(self, active: list[int], out) -> None:
        return None

    def collect(self, active: list[int], keep: list[int], pending: None) -> tuple[torch.Tensor, torch.Tensor]:
        if len(keep) < len(active):
            self.cache.batch_select_indices(torch.tensor(keep, device=self.mask.device))
            self.mask = self.mask[keep]
        live = [active[b] for b in keep]
        logits, self.mask = _decode(self.model, self.rows, live, self.cache, self.mask, self.capture)
        return sample_rows(self.rows, live, logits)


class _StaticSteps:
    """Decode steps over a StaticDecoder: live rows are cache rows 0..n-1 (compacted when rows finish). When the
    live rows share sampling params (always, in RL) the decoder samples inside its step — on GPU one CUDA graph
    from tokens in to tokens out — and the next step is queued ahead: its tokens are the previous step's output,
    on the device; rows found finished afterwards are dropped from its result (their extra token is discarded)."""

    def __init__(self, decoder, rows: list[Row], pad_id: int) -> None:
        self.decoder, self.rows, self.pad_id = decoder, rows, pad_id
        self.want_routed = any(r.req.return_routed_experts for r in rows)

    def first(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows
        self.decoder.reserve(max(len(r.req.input_ids) + r.req.sampling.max_new_tokens for r in rows))
        logits, routed = self.decoder.prefill([r.req.input_ids for r in rows], self.pad_id)
        if self.want_routed:
            for b, row in enumerate(rows):
                row.routed.append(routed[b, :len(row.req.input_ids)])
        return sample_rows(rows, list(range(len(rows))), logits)

    def ahead(self, active: list[int], out: tuple[torch.Tensor, torch.Tensor]):
        """Queue the step after `out` for every active row (before their tokens are emitted: a row's next
        position is prompt + tokens so far, its draw the one of step len(output_ids) + 1); None unless the rows
        share sampling params."""
        if len(sampling_groups(self.rows, active)) != 1:
            return None
        live = [self.rows[i] for i in active]
        fed = [len(r.req.input_ids) + len(r.output_ids) for r in live]
        bits = counter_bits_many([r.req.seed for r in live], [len(r.output_ids) + 1 for r in live])
        return self.decoder.decode_sampled(out[0], fed, bits, live[0].req.sampling), fed

    def collect(self, active: list[int], keep: list[int], pending) -> tuple[torch.Tensor, torch.Tensor]:
        if pending is None:
            return self._step([active[b] for b in keep], compact=keep if len(keep) < len(active) else None)
        (tokens, logps, routed), fed = pending
        if len(keep) < len(active):  # rows finished: keep the others' results and cache rows
            index = torch.tensor(keep, device=tokens.device)
            tokens, logps = tokens[index], logps[index]
            routed = routed[index] if routed is not None else None
            self.decoder.compact(keep, span=max(fed) + 1)  # the queued step wrote slot `fed`
        self._add_routed([active[b] for b in keep], routed)
        return tokens, logps

    def _step(self, live_ids: list[int], compact: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step for the live rows now (rows with different sampling params: sampled outside the graph)."""
        live = [self.rows[i] for i in live_ids]
        fed = [len(r.req.input_ids) + len(r.output_ids) - 1 for r in live]  # each row's next position
        if compact is not None:
            self.decoder.compact(compact, span=max(fed))  # slots below each row's next position are written
        logits, routed = self.decoder.decode([r.output_ids[-1] for r in live], fed)
        self._add_routed(live_ids, routed)
        return sample_rows(self.rows, live_ids, logits)

    def _add_routed(self, live_ids: list[int], routed: torch.Tensor | None) -> None:
        if self.want_routed:
            routed = routed.clone()  # a graph's output buffer is rewritten by its next replay
            for b, i in enumerate(live_ids):
                self.rows[i].routed.append(routed[b])
