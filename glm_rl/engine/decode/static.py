"""Decoding with a preallocated KV cache, replayed as CUDA graphs on GPU: the embedded engine's fast path.

Why: with HF's `DynamicCache` every decode step re-launches a few hundred small kernels from Python and grows
the cache by concatenation; at batch 64 on an H100 the GPU waits on the host most of the step. Here the cache
is one tensor per layer and K / V, every decode step has the same shapes for a given (batch bucket, attended
length bucket), so the whole step — embedding to logits, MoE routing included — is captured once as a CUDA
graph and replayed with one launch (what SGLang does with `--cuda-graph-max-bs`).

The model is the engine's HF `Glm4MoeForCausalLM` itself: norms, projections, the sigmoid router, the experts
(transformers' grouped-GEMM experts, graph-safe) and the shared expert are its modules, called here; only the
attention over the cache and the layer loop are written out. Weight updates copy into those modules'
parameters in place, so captured graphs see new weights without re-capture.

Layout: cache row b holds request b's keys at slot == position (no left padding): the prompt is prefilled right
-padded (pad slots get garbage keys that no query ever attends: the mask hides slots >= the row's length, and a
decode step writes its slot before reading it). When rows finish the cache is compacted so the live rows are
rows 0..n-1, and the step runs the smallest captured batch bucket >= n (extra rows decode garbage, unread).
Attention reads only the first `T` slots, `T` a power of two >= the longest live position + 1 (graph per T).

MTP speculative decoding (speculative.py) runs over the same cache: `verify` feeds S tokens per row at their
positions and returns every position's logits, final hidden states and routed experts (rejected drafts' slots
are simply rewritten by a later step, slot == position). With `mtp=` the decoder also holds a cache for the
MTP layer's attention, where the pair (h_t, token t+1) — HF position id t+1 — sits at slot t, so its slots line
up with the main cache's and one `compact` moves both; `mtp_forward` runs the layer over such pairs. Verify and
MTP steps are CUDA graphs like decode, keyed also on S (and on which step it is). `decode_sampled` and
`verify_greedy` go further: the sampler (or greedy acceptance and the next draft) runs inside the step's graph,
and the step takes device inputs, so the caller can queue the next step before reading this one's results.
"""

from __future__ import annotations

import logging
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from transformers.models.glm4_moe.modeling_glm4_moe import apply_rotary_pos_emb

from glm_rl.engine.generation import SamplingParams, bits_to_uniform, sample_tokens

log = logging.getLogger(__name__)

MIN_SPAN = 64  # smallest attended-length bucket


def batch_bucket(n: int, max_batch: int) -> int:
    """Captured batch sizes: 1, 2, 4, 8, then multiples of 8 (SGLang's default ladder), capped at max_batch."""
    size = n if n <= 2 else 1 << (n - 1).bit_length() if n <= 8 else -(-n // 8) * 8
    return min(size, max_batch)


def span_bucket(length: int) -> int:
    """Attended cache length for `length` live slots: the next power of two, at least MIN_SPAN."""
    return max(MIN_SPAN, 1 << (max(length, 1) - 1).bit_length())


class StaticDecoder:
    """Prefill, decode and (with `mtp`) speculative verify / MTP steps over preallocated KV caches (`max_batch`
    rows), CUDA-graphed on GPU."""

    def __init__(self, model, *, max_batch: int, cuda_graph: bool = True, torch_compile: bool = False,
                 mtp=None) -> None:
        cfg = model.config
        self.model, self.max_batch = model, max_batch
        self.mtp = mtp                                       # HF MtpModel (speculative decoding) or None
        self.layers = list(model.model.layers)
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.groups = cfg.num_attention_heads // cfg.num_key_value_heads
        self.device, self.dtype = model.device, model.dtype
        # graphs need a step without host synchronisation: transformers' grouped-GEMM experts are, on torch's
        # bf16 grouped GEMM; other dtypes take torch's fallback, which reads the expert offsets on the host
        self.cuda_graph = cuda_graph and self.device.type == "cuda" and self.dtype == torch.bfloat16
        self.capacity = 0                                   # slots per cache row
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.mtp_k: list[torch.Tensor] = []                 # the MTP layer's cache (with `mtp`), same shape
        self.mtp_v: list[torch.Tensor] = []
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict]] = {}
        self._pool = None
        # torch.compile (SGLang's --enable-torch-compile) fuses the step's many small elementwise kernels; only
        # under graphs, whose bucketed shapes keep recompiles few (dynamic shapes after the first recompile), and
        # in bf16: under compile, transformers' grouped-GEMM experts fall back to a host-synchronising loop for
        # other dtypes, which no graph can capture
        self.compiled = torch_compile and self.cuda_graph and self.dtype == torch.bfloat16
        self._step = torch.compile(self._decode_step) if self.compiled else self._decode_step
        self._eager_steps = {"decode": self._decode_step, "verify": self._verify_step, "mtp": self._mtp_step,
                             "greedy_spec": self._greedy_spec_step}

    # -- cache -------------------------------------------------------------------------------------------------
    def reserve(self, length: int) -> None:
        """Make every cache row hold `length` slots (grows in powers of two; growing drops captured graphs)."""
        need = span_bucket(length)
        if need <= self.capacity:
            return
        self._graphs.clear()
        shape = (self.max_batch, self.kv_heads, need, self.head_dim)
        self.k = self.v = self.mtp_k = self.mtp_v = []  # free the old cache first
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        if self.mtp is not None:  # GLM's MTP block is a decoder layer of the main model's shape
            self.mtp_k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.mtp.layers]
            self.mtp_v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.mtp.layers]
        self.capacity = need

    def compact(self, keep: list[int], span: int) -> None:
        """Move cache rows `keep` to rows 0..len(keep)-1 (their first `span` slots: the rest is unread)."""
        if keep == list(range(len(keep))):
            return
        index = torch.tensor(keep, device=self.device)
        for cache in (*self.k, *self.v, *self.mtp_k, *self.mtp_v):
            cache[:len(keep), :, :span] = cache[index, :, :span]

    # -- the model, written out around the cache --------------------------------------------------------------
    def _attention(self, cache: tuple[torch.Tensor, torch.Tensor], attn, x: torch.Tensor, cos, sin,
                   slots: torch.Tensor, mask: torch.Tensor, span: int) -> torch.Tensor:
        """Attention of x [B, S, H] whose keys go to cache slots `slots` [B, S], over the first `span` slots."""
        B, S, _ = x.shape
        shape = (B, S, -1, self.head_dim)
        q, k, v = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape), attn.v_proj(x).view(shape)
        if attn.use_qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        rows = torch.arange(B, device=x.device)[:, None].expand(B, S)
        k_cache, v_cache = cache
        k_cache[rows, :, slots] = k.transpose(1, 2)
        v_cache[rows, :, slots] = v
        keys, values = k_cache[:B, :, :span], v_cache[:B, :, :span]
        # GQA without copying the cache: the query heads of one KV head become extra query rows
        q = q.reshape(B, self.kv_heads, self.groups * S, self.head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.repeat(1, 1, self.groups, 1),
                                             scale=attn.scaling)
        # reshape, not view: the attention kernel chosen (it differs under graph capture) sets out's strides
        out = out.reshape(B, self.kv_heads * self.groups, S, self.head_dim).transpose(1, 2).reshape(B, S, -1)
        return attn.o_proj(out)

    def _layer(self, cache, layer, x, cos, sin, slots, mask, span, routed: list | None) -> torch.Tensor:
        """One decoder layer (dense or MoE); a MoE layer's expert choices are appended to `routed`."""
        x = x + self._attention(cache, layer.self_attn, layer.input_layernorm(x), cos, sin, slots, mask, span)
        h = layer.post_attention_layernorm(x)
        if not hasattr(layer.mlp, "experts"):
            return x + layer.mlp(h)
        moe, flat = layer.mlp, h.reshape(-1, h.shape[-1])
        _, weights, experts = moe.gate(flat)                  # HF's router: sigmoid, bias, groups, scaling
        if routed is not None:
            routed.append(experts.reshape(*h.shape[:2], -1))
        return x + moe.experts(flat, experts, weights).view_as(h) + moe.shared_experts(h)

    def _body(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
              span: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(final-normed hidden states [B, S, H], routed experts [B, S, n_moe, top_k] or None)."""
        body = self.model.model
        x = body.embed_tokens(ids)
        cos, sin = body.rotary_emb(x, pos)
        routed: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            x = self._layer((self.k[i], self.v[i]), layer, x, cos, sin, pos, mask, span, routed)  # slot == position
        return body.norm(x), (torch.stack(routed, dim=2) if routed else None)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, last: torch.Tensor,
                 span: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits [B, V] at column `last` of each row, routed experts [B, S, n_moe, top_k] or None)."""
        hidden, routed = self._body(ids, pos, mask, span)
        return self.model.lm_head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last]), routed

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
        return self._forward(ids, pos, mask, lengths - 1, width)

    @torch.no_grad()
    def prefill_states(self, prompts: list[tuple[int, ...]],
                       pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`prefill` that also returns every position's final-normed hidden state [n, S, H] (what the MTP layer
        reads): (last-token logits [n, V], hidden states, routed experts or None)."""
        ids, pos, mask, lengths, width = self._prompt_batch(prompts, pad_id)
        hidden, routed = self._body(ids, pos, mask, width)
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
    def decode_sampled(self, tokens: torch.Tensor, positions: list[int], bits,
                       sampling: SamplingParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`decode`, then `generation.sample_tokens` inside the same step (one CUDA graph per sampling params, from
        tokens in to tokens out), each row drawn at the uniform of its `counter_bits` (`bits`: ints or an int64
        array); (tokens [n], logprobs [n], routed experts or None), graph buffers. `tokens` is a device tensor
        (the previous step's output): nothing here waits for the GPU, so a caller can queue this step while the
        previous one runs (positions and bits cross in one copy from pinned memory)."""
        span = min(span_bucket(max(positions) + 1), self.capacity)
        pos_bits = self.to_device(np.stack([np.asarray(positions, dtype=np.int64),
                                             np.asarray(bits, dtype=np.int64)]))
        key = (sampling.temperature, sampling.top_k, sampling.top_p)
        eager = partial(self._sampled_step, decode=self._decode_step, sampling=sampling)
        fast = partial(self._sampled_step, decode=self._step, sampling=sampling)
        return self._run("sampled", span, True, key=key, steps=(eager, fast), ids=tokens[:, None],
                         pos=pos_bits[0][:, None], bits=pos_bits[1])

    @torch.no_grad()
    def verify(self, tokens: list[list[int]],
               starts: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
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
    def mtp_forward(self, hidden: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, graph: bool = True,
                    max_position: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
        return self.to_device(np.stack([np.asarray(tokens, dtype=np.int64),
                                        np.asarray(starts, dtype=np.int64)[:, None] + np.arange(S)]))

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the decoder's device in one copy that does not wait for the GPU (from pinned memory)."""
        host = torch.from_numpy(array)
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def _run(self, kind: str, span: int, use_graph: bool, key: tuple = (), steps: tuple | None = None,
             **inputs: torch.Tensor):
        """Run step `kind` (decode / sampled / verify / mtp; `steps`: its (eager, graphed) functions when not the
        defaults) for the live rows: eagerly, or as the CUDA graph for (kind, batch bucket, S, span, *key),
        copying the inputs into its buffers (unused rows get position 1, a valid slot)."""
        n, S = inputs["ids"].shape
        bucket = batch_bucket(n, self.max_batch)
        eager, fast = steps or (self._eager_steps[kind], self._step if kind == "decode" else self._eager_steps[kind])
        graph = None
        if use_graph and self.cuda_graph:
            graph = self._graph((kind, bucket, S, span, *key), eager, fast, inputs)
        if graph is None:
            return eager(**inputs, span=span)
        graph, io = graph
        for name, value in inputs.items():
            io[name][:n].copy_(value)
        io["pos"][n:].fill_(1)                                  # unused rows attend slot 0 / 1 of their own row
        graph.replay()
        return tuple(out[:n] if out is not None else None for out in io["out"])

    def _decode_step(self, ids: torch.Tensor, pos: torch.Tensor, span: int):
        mask = (torch.arange(span, device=pos.device) <= pos)[:, None, None, :]  # [B, 1, 1, span]
        return self._forward(ids, pos, mask, torch.zeros_like(pos[:, 0]), span)

    def _sampled_step(self, ids: torch.Tensor, pos: torch.Tensor, bits: torch.Tensor, span: int, decode,
                      sampling: SamplingParams):
        logits, routed = decode(ids, pos, span)
        tokens, logps = sample_tokens(logits, sampling, bits_to_uniform(bits))
        return tokens, logps, routed

    def _verify_step(self, ids: torch.Tensor, pos: torch.Tensor, span: int):
        mask = (torch.arange(span, device=pos.device) <= pos[..., None])[:, None]  # [B, 1, S, span]
        hidden, routed = self._body(ids, pos, mask, span)
        return self.model.lm_head(hidden), hidden, routed

    def _greedy_spec_step(self, ids: torch.Tensor, pos: torch.Tensor, span: int):
        """`verify_greedy`'s step: the verify, the acceptance of greedy drafts and the next draft on the device."""
        logits, hidden, routed = self._verify_step(ids, pos, span)
        logits = logits.float()
        best = logits.argmax(dim=-1)                                              # [B, 2]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, best[..., None]).squeeze(-1)
        mtp_logits, _ = self._mtp_step(best, pos + 1, hidden, span)              # pairs (h_t, argmax at t)
        kept = (ids[:, 1] == best[:, 0]).long()                                   # 1 if the draft was right
        rows = torch.arange(ids.shape[0], device=ids.device)
        draft = mtp_logits[rows, kept].argmax(dim=-1)
        # the next step: [the last emitted token, the new draft] from start + kept + 1, clamped into the cache
        # (a row past its budget is finished, and what its queued step computes is discarded)
        next_ids = torch.stack([best[rows, kept], draft], dim=1)
        next_pos = (pos + kept[:, None] + 1).clamp_max(self.capacity - 1)
        return best, logp, draft, kept, next_ids, next_pos, routed

    def _mtp_step(self, ids: torch.Tensor, pos: torch.Tensor, hidden: torch.Tensor, span: int):
        """HF's `MtpLayer.forward` (+ the model's post norms and head) with its attention over the MTP cache."""
        mtp, layer = self.mtp, self.mtp.layers[0]
        embeds = mtp.embed_tokens(ids)
        if getattr(mtp.config, "mtp_hidden_states_first", False):
            x = torch.cat([layer.hnorm(hidden), layer.enorm(embeds)], dim=-1)
        else:
            x = torch.cat([layer.enorm(embeds), layer.hnorm(hidden)], dim=-1)
        cos, sin = mtp.rotary_emb(embeds, pos)
        slots = pos - 1
        mask = (torch.arange(span, device=pos.device) <= slots[..., None])[:, None]  # [B, 1, S, span]
        out = self._layer((self.mtp_k[0], self.mtp_v[0]), layer.mtp_block, layer.eh_proj(x), cos, sin, slots,
                          mask, span, None)
        if layer.use_post_norm:
            out = layer.post_norm(out)
        if mtp.use_shared_post_norm:
            out = mtp.shared_post_norm(out)
        return mtp._project_to_logits(out), out

    def _host_sync(self, step, io: dict, span: int) -> str | None:
        """Run one eager step with torch's sync debug mode set to "error": the error text if it synchronised."""
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(**io, span=span)
        except RuntimeError as e:
            return str(e).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        return None

    def _graph(self, key: tuple, eager, step, inputs: dict[str, torch.Tensor]):
        """The captured step for key (kind, bucket rows, S tokens each, span slots, ...), captured on first use
        from `step` (`eager` checks it first); None (and graphs off for good) when the step synchronises with the
        host, which no capture survives."""
        if key in self._graphs:
            return self._graphs[key]
        kind, bucket, _, span = key[:4]
        # warm-up runs for real: write into the last attended slot, which any live row writes before it reads
        # it (slot == position; the MTP cache's slot is position - 1), so no live key is overwritten
        last = span if kind == "mtp" else span - 1
        io = {name: torch.zeros((bucket, *value.shape[1:]), dtype=value.dtype, device=self.device)
              for name, value in inputs.items()}
        io["pos"].fill_(last)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            if reason := self._host_sync(eager, io, span):
                log.warning("%s step synchronises with the host (%s): CUDA graphs off", kind, reason)
                self.cuda_graph = False
                torch.cuda.current_stream().wait_stream(stream)
                return None
            for _ in range(2):
                step(**io, span=span)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread-local capture: the engine's HTTP thread may touch CUDA (weight updates wait on the model lock,
        # checksums do not) while the scheduler thread captures
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            io["out"] = step(**io, span=span)
        self._graphs[key] = graph, io
        return graph, io
