"""Decoding with a preallocated KV cache, replayed as CUDA graphs on GPU: the embedded engine's fast path.

Why: with HF's `DynamicCache` every decode step re-launches a few hundred small kernels from Python and grows
the cache by concatenation; at batch 64 on an H100 the GPU waits on the host most of the step. Here the cache
is one tensor per layer and K / V, every decode step has the same shapes for a given (batch bucket, attended
length bucket), so the whole step — embedding to logits, MoE routing included — is captured once as a CUDA
graph and replayed with one launch (what SGLang does with `--cuda-graph-max-bs`).

Three layers: `cached_model.py` runs the HF model's own modules around the cache (slot == position),
`graphs.py` captures and replays those steps per shape bucket, and `StaticDecoder` here is what decode loops
call — host inputs in, device tensors out. The prompt is prefilled right-padded (pad slots get garbage keys that
no query ever attends: the mask hides slots >= the row's length). When rows finish the cache is compacted so
the live rows are rows 0..n-1.

MTP speculative decoding (`static_speculative.py`) runs over the same cache: `verify` feeds S tokens per row at
their positions and returns every position's logits, final hidden states and routed experts (rejected drafts'
slots are simply rewritten by a later step, slot == position). With `mtp=` the decoder also holds the MTP
layer's cache, whose slots line up with the main cache's, so one `compact` moves both; `mtp_forward` runs the
layer. `decode_sampled` and `verify_greedy` go further: the sampler (or greedy acceptance and the next draft)
runs inside the step's graph, and the step takes device inputs, so the caller can queue the next step before
reading this one's results.

`StaticSteps` + `run_static`: the plain decode loop (`loop.run_steps`) over a StaticDecoder. When the live rows
share sampling params (always, in RL) the sampler runs inside the decode step and the next step is queued before
the host reads the last one's tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from glm_rl.engine.batch import RoutedLog, Row, SamplingParams
from glm_rl.engine.decode.cached_model import CachedModel
from glm_rl.engine.decode.graphs import StepGraphs, span_bucket
from glm_rl.engine.decode.loop import run_steps
from glm_rl.engine.sampling import counter_bits_many, sample_rows, sampling_groups


class StaticDecoder:
    """Prefill, decode and (with `mtp`) speculative verify / MTP steps over preallocated KV caches (`max_batch`
    rows), CUDA-graphed on GPU."""

    def __init__(
        self, model, *, max_batch: int, cuda_graph: bool = True, torch_compile: bool = False, mtp=None
    ) -> None:
        self.model, self.max_batch = model, max_batch
        self.mtp = mtp  # HF MtpModel (speculative decoding) or None
        self.device, self.dtype = model.device, model.dtype
        self.cached = CachedModel(model, max_batch=max_batch, mtp=mtp)
        # graphs need a step without host synchronisation: transformers' grouped-GEMM experts are, on torch's
        # bf16 grouped GEMM; other dtypes take torch's fallback, which reads the expert offsets on the host
        self.graphs = StepGraphs(
            self.device, max_batch, enabled=cuda_graph and self.device.type == "cuda" and self.dtype == torch.bfloat16
        )
        # torch.compile (SGLang's --enable-torch-compile) fuses the step's many small elementwise kernels; only
        # under graphs, whose bucketed shapes keep recompiles few (dynamic shapes after the first recompile), and
        # in bf16: under compile, transformers' grouped-GEMM experts fall back to a host-synchronising loop for
        # other dtypes, which no graph can capture
        self.compiled = torch_compile and self.graphs.enabled and self.dtype == torch.bfloat16
        cm = self.cached
        self._step = torch.compile(cm.decode_step) if self.compiled else cm.decode_step
        self._eager_steps = {
            "decode": cm.decode_step,
            "verify": cm.verify_step,
            "mtp": cm.mtp_step,
            "greedy_spec": cm.greedy_spec_step,
        }

    # -- cache -------------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Slots per cache row."""
        return self.cached.capacity

    def reserve(self, length: int) -> None:
        """Make every cache row hold `length` slots (grows in powers of two; growing drops captured graphs)."""
        need = span_bucket(length)
        if need <= self.cached.capacity:
            return
        self.graphs.clear()
        self.cached.grow(need)

    def compact(self, keep: list[int], span: int) -> None:
        """Move cache rows `keep` to rows 0..len(keep)-1 (their first `span` slots: the rest is unread)."""
        self.cached.compact(keep, span)

    def release(self) -> None:
        """Free the KV cache and every captured graph (and its memory pool); the next batch allocates and
        captures again, at whatever addresses the weights then have."""
        self.graphs.release_pool()
        self.cached.grow(0)

    # -- prefill / decode ---------------------------------------------------------------------------------------
    def _prompt_batch(self, prompts: list[tuple[int, ...]], pad_id: int):
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        width = int(lengths.max())
        ids = torch.tensor([list(p) + [pad_id] * (width - len(p)) for p in prompts], device=self.device)
        pos = torch.arange(width, device=self.device).expand(len(prompts), width)
        keys = torch.arange(width, device=self.device)
        # query i of row b sees keys j <= i of its own prompt
        mask = (keys[None, :] <= keys[:, None])[None] & (keys < lengths[:, None])[:, None, :]
        return ids, pos, mask[:, None], lengths, width

    @torch.no_grad()
    def prefill(self, prompts: list[tuple[int, ...]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run right-padded prompts into cache rows 0..n-1; (logits [n, V] of each last prompt token, routed
        experts [n, S, n_moe, top_k] (row b valid for its first len(prompt b) positions) or None)."""
        ids, pos, mask, lengths, width = self._prompt_batch(prompts, pad_id)
        return self.cached.forward(ids, pos, mask, lengths - 1, width)

    @torch.no_grad()
    def prefill_states(
        self, prompts: list[tuple[int, ...]], pad_id: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`prefill` that also returns every position's final-normed hidden state [n, S, H] (what the MTP layer
        reads): (last-token logits [n, V], hidden states, routed experts or None)."""
        ids, pos, mask, lengths, width = self._prompt_batch(prompts, pad_id)
        hidden, routed = self.cached.body(ids, pos, mask, width)
        last = hidden[torch.arange(len(prompts), device=self.device), lengths - 1]
        return self.model.lm_head(last), hidden, routed

    @torch.no_grad()
    def decode(self, tokens: list[int], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed one token per live row (rows 0..n-1) at its position; (logits [n, V], routed experts
        [n, 1, n_moe, top_k] or None). Rows must have been prefilled; positions < capacity."""
        span = min(span_bucket(max(positions) + 1), self.capacity)
        tokens, positions = self.to_device(np.array([tokens, positions], dtype=np.int64))
        return self._run("decode", span, True, ids=tokens[:, None], pos=positions[:, None])

    @torch.no_grad()
    def decode_sampled(
        self, tokens: torch.Tensor, positions: list[int], bits, sampling: SamplingParams
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`decode`, then `sampling.sample_tokens` inside the same step (one CUDA graph per sampling params, from
        tokens in to tokens out), each row drawn at the uniform of its `counter_bits` (`bits`: ints or an int64
        array); (tokens [n], logprobs [n], routed experts or None), graph buffers. `tokens` is a device tensor
        (the previous step's output): nothing here waits for the GPU, so a caller can queue this step while the
        previous one runs (positions and bits cross in one copy from pinned memory)."""
        span = min(span_bucket(max(positions) + 1), self.capacity)
        pos_bits = self.to_device(np.stack([np.asarray(positions, dtype=np.int64), np.asarray(bits, dtype=np.int64)]))
        key = (sampling.temperature, sampling.top_k, sampling.top_p)
        eager = partial(self.cached.sampled_step, decode=self.cached.decode_step, sampling=sampling)
        fast = partial(self.cached.sampled_step, decode=self._step, sampling=sampling)
        return self._run(
            "sampled",
            span,
            True,
            key=key,
            steps=(eager, fast),
            ids=tokens[:, None],
            pos=pos_bits[0][:, None],
            bits=pos_bits[1],
        )

    @torch.no_grad()
    def verify(
        self, tokens: list[list[int]], starts: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Feed S tokens per live row (rows 0..n-1) at positions start..start+S-1 (speculative decoding's verify
        forward); (logits [n, S, V], final-normed hidden states [n, S, H], routed experts [n, S, n_moe, top_k]
        or None). Outputs may be graph buffers, rewritten by the next verify: copy what must outlive it."""
        span = min(span_bucket(max(starts) + len(tokens[0])), self.capacity)
        ids, pos = self._ids_and_positions(tokens, starts)
        return self._run("verify", span, True, ids=ids, pos=pos)

    @torch.no_grad()
    def verify_greedy(self, tokens: list[list[int]], starts: list[int]) -> tuple[torch.Tensor | None, ...]:
        """Greedy speculative decoding's whole step with one draft, as one CUDA graph: verify [last token, draft]
        at positions start, start + 1; the argmax token and its logprob at both; the MTP layer over the pairs
        (h_start+i, argmax_i) (MTP slots start, start + 1); the next draft from the pair at the last kept
        position (start + 1 if the draft equalled the first argmax, else start). For greedy rows the emitted
        tokens are exactly the argmaxes up to there, so nothing has to cross to the host in between.
        Returns graph buffers: (argmax [n, 2], logprobs [n, 2], next draft [n], drafts kept [n] (0 / 1), the next
        step's tokens [n, 2] and positions [n, 2] (for `verify_greedy_queued`), routed experts [n, 2, n_moe,
        top_k] or None)."""
        if len(tokens[0]) != 2:
            raise ValueError(f"verify_greedy takes [last token, one draft] per row, got {len(tokens[0])} tokens")
        return self.verify_greedy_queued(*self._ids_and_positions(tokens, starts), max(starts))

    @torch.no_grad()
    def verify_greedy_queued(self, ids: torch.Tensor, pos: torch.Tensor, max_start: int) -> tuple:
        """`verify_greedy` from device inputs — the previous step's next tokens / positions — so it can be queued
        before the host has read that step; `max_start` bounds the rows' starts (it sizes the attended span)."""
        if self.mtp is None:
            raise ValueError("StaticDecoder.verify_greedy needs the decoder built with mtp=<MtpModel>")
        span = min(span_bucket(max_start + 2), self.capacity)
        return self._run("greedy_spec", span, True, ids=ids, pos=pos)

    @torch.no_grad()
    def mtp_forward(
        self,
        hidden: torch.Tensor,
        ids: torch.Tensor,
        positions: torch.Tensor,
        graph: bool = True,
        max_position: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP layer over pairs (hidden[b, s], ids[b, s]) at HF position ids `positions` (the main position of
        the hidden state + 1; cache slot = position - 1) for live rows 0..n-1, each pair seeing the row's earlier
        slots: (logits [n, S, V], output hidden states [n, S, H]), possibly graph buffers (graph=False: eager,
        for one-off shapes such as a prompt's width). `max_position`: positions.max() when the caller knows it
        (reading it from the device would wait for the GPU)."""
        if self.mtp is None:
            raise ValueError("StaticDecoder.mtp_forward needs the decoder built with mtp=<MtpModel>")
        span = min(span_bucket(int(positions.max()) if max_position is None else max_position), self.capacity)
        return self._run("mtp", span, graph, ids=ids, pos=positions, hidden=hidden)

    def _ids_and_positions(self, tokens: list[list[int]], starts: list[int]) -> torch.Tensor:
        """(ids [n, S], positions start..start+S-1 [n, S]) on the device, in one copy."""
        S = len(tokens[0])
        return self.to_device(
            np.stack([np.asarray(tokens, dtype=np.int64), np.asarray(starts, dtype=np.int64)[:, None] + np.arange(S)])
        )

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the decoder's device in one copy that does not wait for the GPU (from pinned memory)."""
        host = torch.from_numpy(array)
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def _run(
        self, kind: str, span: int, use_graph: bool, key: tuple = (), steps: tuple | None = None, **inputs: torch.Tensor
    ):
        """Run step `kind` (decode / sampled / verify / mtp / greedy_spec; `steps`: its (eager, graphed) functions
        when not the defaults) for the live rows: eagerly, or as its CUDA graph (`graphs.StepGraphs`)."""
        eager, fast = steps or (self._eager_steps[kind], self._step if kind == "decode" else self._eager_steps[kind])
        if not (use_graph and self.graphs.enabled):
            return eager(**inputs, span=span)
        # a capture's warm-up runs write the last attended slot, which any live row writes before it reads it
        # (slot == position; the MTP cache's slot is position - 1), so no live key is overwritten
        warm_pos = span if kind == "mtp" else span - 1
        return self.graphs.run((kind, *key), eager, fast, inputs, span, warm_pos)


class StaticSteps:
    """`loop.Steps` over a StaticDecoder: live rows are cache rows 0..n-1 (compacted when rows finish). When the
    live rows share sampling params (always, in RL) the decoder samples inside its step — on GPU one CUDA graph
    from tokens in to tokens out — and the next step is queued ahead: its tokens are the previous step's output,
    on the device; rows found finished afterwards are dropped from its result (their extra token is discarded)."""

    def __init__(self, decoder: StaticDecoder, rows: list[Row], pad_id: int) -> None:
        self.decoder, self.rows, self.pad_id = decoder, rows, pad_id
        self.want_routed = any(r.req.return_routed_experts for r in rows)
        self.routed = RoutedLog()  # the rows get their routed experts when the batch ends (`RoutedLog.finish`)

    def first(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows
        self.decoder.reserve(max(len(r.req.input_ids) + r.req.sampling.max_new_tokens for r in rows))
        logits, routed = self.decoder.prefill([r.req.input_ids for r in rows], self.pad_id)
        if self.want_routed:
            self.routed.add(range(len(rows)), routed, counts=[len(r.req.input_ids) for r in rows])
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
            self.routed.add(live_ids, routed)


@torch.no_grad()
def run_static(decoder: StaticDecoder, rows: list[Row], *, pad_id: int, should_abort: Callable[[], bool]) -> list[Row]:
    """Decode `rows` to the end over the decoder's preallocated cache."""
    steps = StaticSteps(decoder, rows, pad_id)
    run_steps(rows, steps, should_abort)
    steps.routed.finish(rows)
    return rows
