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
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers.models.glm4_moe.modeling_glm4_moe import apply_rotary_pos_emb

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
    """Prefill and decode over one preallocated KV cache (`max_batch` rows), CUDA-graphed decode on GPU."""

    def __init__(self, model, *, max_batch: int, cuda_graph: bool = True, torch_compile: bool = False) -> None:
        cfg = model.config
        self.model, self.max_batch = model, max_batch
        self.layers = list(model.model.layers)
        self.first_moe = cfg.first_k_dense_replace
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
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict]] = {}
        self._pool = None
        # torch.compile (SGLang's --enable-torch-compile) fuses the step's many small elementwise kernels; only
        # under graphs, whose bucketed shapes keep recompiles few (dynamic shapes after the first recompile), and
        # in bf16: under compile, transformers' grouped-GEMM experts fall back to a host-synchronising loop for
        # other dtypes, which no graph can capture
        self.compiled = torch_compile and self.cuda_graph and self.dtype == torch.bfloat16
        self._step = torch.compile(self._decode_step) if self.compiled else self._decode_step

    # -- cache -------------------------------------------------------------------------------------------------
    def reserve(self, length: int) -> None:
        """Make every cache row hold `length` slots (grows in powers of two; growing drops captured graphs)."""
        need = span_bucket(length)
        if need <= self.capacity:
            return
        self._graphs.clear()
        shape = (self.max_batch, self.kv_heads, need, self.head_dim)
        self.k = self.v = []  # free the old cache first
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.capacity = need

    def compact(self, keep: list[int], span: int) -> None:
        """Move cache rows `keep` to rows 0..len(keep)-1 (their first `span` slots: the rest is unread)."""
        if keep == list(range(len(keep))):
            return
        index = torch.tensor(keep, device=self.device)
        for cache in (*self.k, *self.v):
            cache[:len(keep), :, :span] = cache[index, :, :span]

    # -- the model, written out around the cache --------------------------------------------------------------
    def _attention(self, i: int, attn, x: torch.Tensor, cos, sin, pos: torch.Tensor, mask: torch.Tensor,
                   span: int) -> torch.Tensor:
        B, S, _ = x.shape
        shape = (B, S, -1, self.head_dim)
        q, k, v = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape), attn.v_proj(x).view(shape)
        if attn.use_qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        rows = torch.arange(B, device=x.device)[:, None].expand(B, S)
        self.k[i][rows, :, pos] = k.transpose(1, 2)           # slot == position
        self.v[i][rows, :, pos] = v
        keys, values = self.k[i][:B, :, :span], self.v[i][:B, :, :span]
        # GQA without copying the cache: the query heads of one KV head become extra query rows
        q = q.reshape(B, self.kv_heads, self.groups * S, self.head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.repeat(1, 1, self.groups, 1),
                                             scale=attn.scaling)
        # reshape, not view: the attention kernel chosen (it differs under graph capture) sets out's strides
        out = out.reshape(B, self.kv_heads * self.groups, S, self.head_dim).transpose(1, 2).reshape(B, S, -1)
        return attn.o_proj(out)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, last: torch.Tensor,
                 span: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits [B, V] at column `last` of each row, routed experts [B, S, n_moe, top_k] or None)."""
        body = self.model.model
        x = body.embed_tokens(ids)
        cos, sin = body.rotary_emb(x, pos)
        routed = []
        for i, layer in enumerate(self.layers):
            x = x + self._attention(i, layer.self_attn, layer.input_layernorm(x), cos, sin, pos, mask, span)
            h = layer.post_attention_layernorm(x)
            if i < self.first_moe:
                x = x + layer.mlp(h)
                continue
            moe, flat = layer.mlp, h.reshape(-1, h.shape[-1])
            _, weights, experts = moe.gate(flat)              # HF's router: sigmoid, bias, groups, scaling
            routed.append(experts.reshape(*h.shape[:2], -1))
            x = x + moe.experts(flat, experts, weights).view_as(h) + moe.shared_experts(h)
        x = x[torch.arange(x.shape[0], device=x.device), last]
        logits = self.model.lm_head(body.norm(x))
        return logits, (torch.stack(routed, dim=2) if routed else None)

    # -- prefill / decode ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompts: list[tuple[int, ...]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run right-padded prompts into cache rows 0..n-1; (logits [n, V] of each last prompt token, routed
        experts [n, S, n_moe, top_k] (row b valid for its first len(prompt b) positions) or None)."""
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        width = int(lengths.max())
        ids = torch.tensor([list(p) + [pad_id] * (width - len(p)) for p in prompts], device=self.device)
        pos = torch.arange(width, device=self.device).expand(len(prompts), width)
        keys = torch.arange(width, device=self.device)
        # query i of row b sees keys j <= i of its own prompt
        mask = (keys[None, :] <= keys[:, None])[None] & (keys < lengths[:, None])[:, None, :]
        return self._forward(ids, pos, mask[:, None], lengths - 1, width)

    @torch.no_grad()
    def decode(self, tokens: list[int], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed one token per live row (rows 0..n-1) at its position; (logits [n, V], routed experts
        [n, 1, n_moe, top_k] or None). Rows must have been prefilled; positions < capacity."""
        n = len(tokens)
        bucket = batch_bucket(n, self.max_batch)
        span = min(span_bucket(max(positions) + 1), self.capacity)
        tokens, positions = torch.tensor([tokens, positions], device=self.device)  # one host-to-device copy
        graph = self._graph(bucket, span) if self.cuda_graph else None
        if graph is None:
            return self._decode_step(tokens[:, None], positions[:, None], span)
        graph, io = graph
        io["ids"][:n, 0].copy_(tokens)
        io["pos"][:n, 0].copy_(positions)
        io["pos"][n:].zero_()                                  # unused rows attend slot 0 of their own row
        graph.replay()
        routed = io["routed"][:n] if io["routed"] is not None else None
        return io["logits"][:n], routed

    def _decode_step(self, ids: torch.Tensor, pos: torch.Tensor, span: int):
        mask = (torch.arange(span, device=pos.device) <= pos)[:, None, None, :]  # [B, 1, 1, span]
        return self._forward(ids, pos, mask, torch.zeros_like(pos[:, 0]), span)

    def _host_sync(self, io: dict, span: int) -> str | None:
        """Run one eager step with torch's sync debug mode set to "error": the error text if it synchronised."""
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            self._decode_step(io["ids"], io["pos"], span)
        except RuntimeError as e:
            return str(e).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        return None

    def _graph(self, bucket: int, span: int):
        """The captured decode step for (bucket rows, span slots), captured on first use; None (and graphs off
        for good) when the step synchronises with the host, which no capture survives."""
        if (bucket, span) in self._graphs:
            return self._graphs[(bucket, span)]
        io = {"ids": torch.zeros((bucket, 1), dtype=torch.long, device=self.device),
              # warm-up runs for real: write into the last attended slot, which any live row writes before
              # it reads it (slot == position), so no live key is overwritten
              "pos": torch.full((bucket, 1), span - 1, dtype=torch.long, device=self.device)}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            if reason := self._host_sync(io, span):
                log.warning("decode step synchronises with the host (%s): CUDA graphs off", reason)
                self.cuda_graph = False
                torch.cuda.current_stream().wait_stream(stream)
                return None
            for _ in range(2):
                self._step(io["ids"], io["pos"], span)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread-local capture: the engine's HTTP thread may touch CUDA (weight updates wait on the model lock,
        # checksums do not) while the scheduler thread captures
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            io["logits"], io["routed"] = self._step(io["ids"], io["pos"], span)
        self._graphs[(bucket, span)] = graph, io
        return graph, io
