"""Context parallelism for the local (non Transformer-Engine) layer spec: a core-attention module and the
sequence split that goes with it.

megatron-core's local `DotProductAttention` refuses CP (only TE's attention implements it, and TE cannot be
installed here nor on the GPU box; FACTS.md). `ContextParallelAttention` takes its place in the layer spec
when CP > 1 and does the simplest correct thing: all-gather K and V over the CP group and attend with a causal
mask built from global positions. Memory for K/V is the full sequence per rank (fine for RL sequence lengths;
a ring exchange would be the next step for very long contexts).

Sequence layout (Megatron's load balancing): the (padded) sequence is cut into 2×CP equal chunks and CP rank r
holds chunks r and 2·CP−1−r, so every rank gets the same share of causal work. `split_for_cp` makes that
split for inputs (ids, positions, labels, masks); `gather_from_cp` undoes it for outputs (logits, logprobs).
RoPE needs nothing from us: megatron's `RotaryEmbedding` computes the full-length table and picks the same
two chunks (`rope_utils.get_pos_emb_on_this_cp_rank`), so each row is rotated by its global position.

Backward: K/V are gathered with megatron's `gather_from_sequence_parallel_region` on the CP group, whose
backward reduce-scatters the K/V gradients back to their owners (every rank's queries attend to them).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _chunk_order(cp: int) -> list[int]:
    """Chunk indices in the order the CP ranks hold them: [0, 2cp-1, 1, 2cp-2, ...]."""
    return [c for r in range(cp) for c in (r, 2 * cp - 1 - r)]


def split_for_cp(x: torch.Tensor, cp_rank: int, cp: int, dim: int = 1) -> torch.Tensor:
    """This CP rank's part of `x` along `dim` (chunks r and 2cp-1-r, concatenated). Length % (2·cp) == 0."""
    if cp == 1:
        return x
    if x.shape[dim] % (2 * cp):
        raise ValueError(f"sequence length {x.shape[dim]} is not a multiple of 2 × context parallel size {cp}")
    chunks = x.chunk(2 * cp, dim=dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp - 1 - cp_rank]], dim=dim)


def gather_from_cp(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Inverse of `split_for_cp` over the CP group: every rank gets the whole sequence in order (no autograd)."""
    cp = dist.get_world_size(group) if group is not None else 1
    if cp == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(cp)]
    dist.all_gather(parts, x.contiguous(), group=group)
    held = [c for p in parts for c in p.chunk(2, dim=dim)]  # in _chunk_order
    ordered = [None] * (2 * cp)
    for chunk, i in zip(held, _chunk_order(cp)):
        ordered[i] = chunk
    return torch.cat(ordered, dim=dim)


def global_positions(local_len: int, cp_rank: int, cp: int, device=None) -> torch.Tensor:
    """(local_len,) global positions of the rows CP rank `cp_rank` holds."""
    half = local_len // 2
    return torch.cat([torch.arange(c * half, (c + 1) * half, device=device) for c in (cp_rank, 2 * cp - 1 - cp_rank)])


class ContextParallelAttention(torch.nn.Module):
    """Causal softmax attention over K/V gathered from the CP group (drop-in for megatron's local
    `DotProductAttention`: same constructor and forward signature, [s, b, heads, d] in, [s, b, heads·d] out)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__()
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.enums import AttnMaskType

        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"ContextParallelAttention supports causal attention only, got {attn_mask_type}")
        if (config.attention_dropout if attention_dropout is None else attention_dropout) != 0:
            raise ValueError("ContextParallelAttention has no attention dropout (GLM-4.5 uses 0)")
        self.config = config
        self.cp_group = pg_collection.cp if pg_collection is not None else ps.get_context_parallel_group()
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("ContextParallelAttention: packed sequences / attention bias are not built")
        cp, rank = self.cp_group.size(), self.cp_group.rank()
        sq, b, heads, d = query.shape  # (S/CP, B, heads, d)
        k = gather_from_sequence_parallel_region(key, tensor_parallel_output_grad=True, group=self.cp_group)
        v = gather_from_sequence_parallel_region(value, tensor_parallel_output_grad=True, group=self.cp_group)
        groups = k.shape[2]  # (S, B, groups, d), rows in CP-rank order
        k, v = (t.repeat_interleave(heads // groups, dim=2) for t in (k, v))
        q_pos = global_positions(sq, rank, cp, query.device)
        k_pos = torch.cat([global_positions(sq, r, cp, query.device) for r in range(cp)])
        future = k_pos[None, :] > q_pos[:, None]  # (S/CP, S) True where the key comes after the query
        scores = torch.einsum("qbhd,kbhd->bhqk", query, k).float() * self.softmax_scale
        probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1).to(query.dtype)
        out = torch.einsum("bhqk,kbhd->qbhd", probs, v)
        return out.reshape(sq, b, heads * d)


class _GatherFromCP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return gather_from_cp(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return split_for_cp(grad, ctx.group.rank(), ctx.group.size(), ctx.dim), None, None


def gather_from_cp_with_grad(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """`gather_from_cp` whose backward keeps only this rank's chunks of the incoming gradient (no reduction).
    Exact when every CP rank then computes the same function of the whole sequence (the RL loss over full
    logprobs): rank r's slice of d loss / d full is d loss / d (its own part), and the CP sum of the parameter
    gradients (optim.py) adds the parts up."""
    if group is None or group.size() == 1:
        return x
    return _GatherFromCP.apply(x, group, dim)
