"""The HF GLM-4.5 model written out around preallocated KV caches: every step the static decoder runs (and may
capture as a CUDA graph), on the device, with no host synchronisation.

The model is the engine's HF `Glm4MoeForCausalLM` itself: norms, projections, the sigmoid router, the experts
(transformers' grouped-GEMM experts, graph-safe) and the shared expert are its modules, called here; only the
attention over the cache and the layer loop are written out. Weight updates copy into those modules'
parameters in place, so captured graphs see new weights without re-capture.

Layout: cache row b holds request b's keys at slot == position (no left padding); a step writes its slot before
reading it, and attention reads only the first `span` slots. The MTP layer's cache (with `mtp`) holds the pair
(h_t, token t+1) — HF position id t+1 — at slot t, so its slots line up with the main cache's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.glm4_moe.modeling_glm4_moe import apply_rotary_pos_emb

from glm_rl.engine.batch import SamplingParams
from glm_rl.engine.sampling import bits_to_uniform, sample_tokens


class CachedModel:
    """`model` (and `mtp`, HF's MtpModel, or None) over KV caches of `max_batch` rows × `capacity` slots."""

    def __init__(self, model, *, max_batch: int, mtp=None) -> None:
        cfg = model.config
        self.model, self.mtp, self.max_batch = model, mtp, max_batch
        self.layers = list(model.model.layers)
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.groups = cfg.num_attention_heads // cfg.num_key_value_heads
        self.device, self.dtype = model.device, model.dtype
        self.capacity = 0  # slots per cache row
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.mtp_k: list[torch.Tensor] = []  # the MTP layer's cache (with `mtp`), same shape
        self.mtp_v: list[torch.Tensor] = []

    # -- cache -------------------------------------------------------------------------------------------------
    def grow(self, slots: int) -> None:
        """Reallocate every cache with `slots` slots per row (contents dropped)."""
        shape = (self.max_batch, self.kv_heads, slots, self.head_dim)
        self.k = self.v = self.mtp_k = self.mtp_v = []  # free the old cache first
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        if self.mtp is not None:  # GLM's MTP block is a decoder layer of the main model's shape
            self.mtp_k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.mtp.layers]
            self.mtp_v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.mtp.layers]
        self.capacity = slots

    def compact(self, keep: list[int], span: int) -> None:
        """Move cache rows `keep` to rows 0..len(keep)-1 (their first `span` slots: the rest is unread)."""
        if keep == list(range(len(keep))):
            return
        index = torch.tensor(keep, device=self.device)
        for cache in (*self.k, *self.v, *self.mtp_k, *self.mtp_v):
            cache[: len(keep), :, :span] = cache[index, :, :span]

    # -- the model, written out around the cache --------------------------------------------------------------
    def _attention(
        self,
        cache: tuple[torch.Tensor, torch.Tensor],
        attn,
        x: torch.Tensor,
        cos,
        sin,
        slots: torch.Tensor,
        mask: torch.Tensor,
        span: int,
    ) -> torch.Tensor:
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
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask.repeat(1, 1, self.groups, 1), scale=attn.scaling
        )
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
        _, weights, experts = moe.gate(flat)  # HF's router: sigmoid, bias, groups, scaling
        if routed is not None:
            routed.append(experts.reshape(*h.shape[:2], -1))
        return x + moe.experts(flat, experts, weights).view_as(h) + moe.shared_experts(h)

    def body(
        self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, span: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(final-normed hidden states [B, S, H], routed experts [B, S, n_moe, top_k] or None)."""
        body = self.model.model
        x = body.embed_tokens(ids)
        cos, sin = body.rotary_emb(x, pos)
        routed: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            x = self._layer((self.k[i], self.v[i]), layer, x, cos, sin, pos, mask, span, routed)  # slot == position
        return body.norm(x), (torch.stack(routed, dim=2) if routed else None)

    def forward(
        self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, last: torch.Tensor, span: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits [B, V] at column `last` of each row, routed experts [B, S, n_moe, top_k] or None)."""
        hidden, routed = self.body(ids, pos, mask, span)
        return self.model.lm_head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last]), routed

    # -- the steps (each graphable) -------------------------------------------------------------------------
    def decode_step(self, ids: torch.Tensor, pos: torch.Tensor, span: int):
        mask = (torch.arange(span, device=pos.device) <= pos)[:, None, None, :]  # [B, 1, 1, span]
        return self.forward(ids, pos, mask, torch.zeros_like(pos[:, 0]), span)

    def sampled_step(
        self, ids: torch.Tensor, pos: torch.Tensor, bits: torch.Tensor, span: int, decode, sampling: SamplingParams
    ):
        logits, routed = decode(ids, pos, span)
        tokens, logps = sample_tokens(logits, sampling, bits_to_uniform(bits))
        return tokens, logps, routed

    def verify_step(self, ids: torch.Tensor, pos: torch.Tensor, span: int):
        mask = (torch.arange(span, device=pos.device) <= pos[..., None])[:, None]  # [B, 1, S, span]
        hidden, routed = self.body(ids, pos, mask, span)
        return self.model.lm_head(hidden), hidden, routed

    def greedy_spec_step(self, ids: torch.Tensor, pos: torch.Tensor, span: int):
        """`verify_greedy`'s step: the verify, the acceptance of greedy drafts and the next draft on the device."""
        logits, hidden, routed = self.verify_step(ids, pos, span)
        logits = logits.float()
        best = logits.argmax(dim=-1)  # [B, 2]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, best[..., None]).squeeze(-1)
        mtp_logits, _ = self.mtp_step(best, pos + 1, hidden, span)  # pairs (h_t, argmax at t)
        kept = (ids[:, 1] == best[:, 0]).long()  # 1 if the draft was right
        rows = torch.arange(ids.shape[0], device=ids.device)
        draft = mtp_logits[rows, kept].argmax(dim=-1)
        # the next step: [the last emitted token, the new draft] from start + kept + 1, clamped into the cache
        # (a row past its budget is finished, and what its queued step computes is discarded)
        next_ids = torch.stack([best[rows, kept], draft], dim=1)
        next_pos = (pos + kept[:, None] + 1).clamp_max(self.capacity - 1)
        return best, logp, draft, kept, next_ids, next_pos, routed

    def mtp_step(self, ids: torch.Tensor, pos: torch.Tensor, hidden: torch.Tensor, span: int):
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
        out = self._layer(
            (self.mtp_k[0], self.mtp_v[0]), layer.mtp_block, layer.eh_proj(x), cos, sin, slots, mask, span, None
        )
        if layer.use_post_norm:
            out = layer.post_norm(out)
        if mtp.use_shared_post_norm:
            out = mtp.shared_post_norm(out)
        return mtp._project_to_logits(out), out
