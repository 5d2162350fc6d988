"""Faster drop-ins for two modules of megatron-core's local (non Transformer-Engine) layer spec.

Transformer Engine cannot be installed on our machines (FACTS.md), and the local spec it leaves is slow where an
MoE model spends its time:
- `SequentialMLP` runs the routed experts one by one (64 small GEMMs per layer and a host sync on
  `tokens_per_expert.tolist()`). `GroupedExperts` keeps the same parameters — `local_experts.N.linear_fc1/fc2`,
  so the HF bridge, checkpoints and weight sync see no difference — and computes all local experts with two
  `torch._grouped_mm` calls over the weights stacked per forward (the stack is a copy: cheap next to the GEMMs,
  and autograd routes each expert's gradient back to its own parameter). 13× the loop's TFLOP/s on an H100
  (FACTS.md).
- `DotProductAttention` materialises the (b·heads, s, s) score matrix. `SDPAAttention` calls
  `F.scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA) with the same inputs and output
  layout, causal masking only (what GLM-4.5 uses); context parallelism is not handled here.

`fast_block_spec` swaps both into a block spec built by `get_gpt_decoder_block_spec(..., use_transformer_engine=
False)`. Numerics equal the originals up to floating-point summation order (tests/test_megatron_fast_modules.py).

`compile_decoder_layers` is regional `torch.compile` of each decoder layer (`layer.compile()`: same parameters, same
state-dict keys), to fuse the elementwise work TE's kernels would (casts, fp32 router, RoPE, SwiGLU, prob scaling).
The alltoall dispatcher's steps that read routing counts on the host (device-to-host copies, `.tolist()` in
`sort_chunks_by_idxs`) stay eager, so an MoE layer is several graphs (about five breaks); the rest is traced.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.moe.experts import SequentialMLP


class GroupedExperts(SequentialMLP):
    """`SequentialMLP` with one grouped GEMM per projection (same parameters, same state dict)."""

    def forward(
        self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor
    ):
        cfg = self.config
        plain = (
            self.tp_group.size() == 1
            and cfg.gated_linear_unit
            and not cfg.add_bias_linear
            and not cfg.moe_apply_probs_on_input
            and not (cfg.fp8 or cfg.fp4)
            and cfg.activation_func_clamp_value is None
            and not cfg.glu_linear_offset
        )
        if not plain or self.num_local_experts == 1:  # expert-TP, biases, quantisation: the reference path
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        x = permuted_local_hidden_states
        counts = torch.as_tensor(tokens_per_expert, device=x.device)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        # (E, out, in) per projection -> (E, in, out): grouped_mm computes x[rows of e] @ w[e]
        fc1 = torch.stack([e.linear_fc1.weight for e in self.local_experts]).transpose(1, 2)
        fc2 = torch.stack([e.linear_fc2.weight for e in self.local_experts]).transpose(1, 2)
        gate, up = _grouped_mm(x, fc1, offs).chunk(2, dim=-1)
        act = cfg.activation_func(gate) * up
        act = (act * permuted_probs.unsqueeze(-1)).to(x.dtype)  # megatron scales after the activation too
        return _grouped_mm(act, fc2, offs), None


@torch.compiler.disable
def _grouped_mm_eager(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offs)


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`torch._grouped_mm`; outside bf16 kept out of compiled graphs (its fake kernel accepts bf16 only, while eager
    CPU runs fp32: the CPU smoke configuration)."""
    if a.dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return _grouped_mm_eager(a, b, offs)
    return torch._grouped_mm(a, b, offs=offs)


class SDPAAttention(DotProductAttention):
    """Causal core attention through `F.scaled_dot_product_attention`; inputs [s, b, heads, d] as Megatron's."""

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        mask_type = attn_mask_type or self.attn_mask_type
        if packed_seq_params is not None or attention_bias is not None or mask_type != AttnMaskType.causal:
            raise NotImplementedError("SDPAAttention handles causal attention without packing or bias only")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            scale=self.softmax_scale,
            dropout_p=self.attention_dropout.p if self.training else 0.0,
        )
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)


def fast_block_spec(block_spec):
    """Swap `SequentialMLP` → `GroupedExperts` and `DotProductAttention` → `SDPAAttention` in place. In
    megatron-core 0.19.2 a layer's `mlp` and the MoE `experts` are `functools.partial` builders."""
    for layer in block_spec.layer_specs:
        attn = layer.submodules.self_attention.submodules
        if attn.core_attention is DotProductAttention:
            attn.core_attention = SDPAAttention
        mlp = layer.submodules.mlp
        moe = mlp.keywords.get("submodules") if isinstance(mlp, partial) else getattr(mlp, "submodules", None)
        experts = getattr(moe, "experts", None)
        if isinstance(experts, partial) and experts.func is SequentialMLP:
            moe.experts = partial(GroupedExperts, *experts.args, **experts.keywords)
    return block_spec


def _tp_group_or_default(tp_group, is_expert: bool = False, check_initialized: bool = True):
    """megatron's `get_tensor_model_parallel_group_if_none` without its deprecation warning: `RowParallelLinear`
    passes `tp_group=None` on every call and `warnings.warn` is a graph break under dynamo."""
    from megatron.core import parallel_state as ps

    if tp_group is not None or not torch.distributed.is_initialized() or not ps.is_initialized():
        return tp_group
    if is_expert:
        return ps.get_expert_tensor_parallel_group(check_initialized=check_initialized)
    return ps.get_tensor_model_parallel_group(check_initialized=check_initialized)


# Token-dispatcher steps that read routing counts on the host (`.tolist()`, device-to-host copies): traced, each
# new routing would be a recompile (dynamo specialises on the values), so they run eagerly, one graph break each.
_HOST_SYNC_METHODS = ("_maybe_dtoh_and_synchronize", "dispatch_postprocess", "combine_preprocess")


def compile_decoder_layers(model: nn.Module) -> int:
    """Regional compile: `layer.compile(dynamic=False)` on each `model.decoder.layers[i]` (shapes are fixed per
    step; layers of one kind, dense or MoE, share graphs), keeping the parameters. Patches megatron's
    tensor-parallel linear to skip the per-call warning (process-wide, numerics unchanged). Returns the number of
    layers compiled."""
    from megatron.core.tensor_parallel import layers as tp_layers

    tp_layers.get_tensor_model_parallel_group_if_none = _tp_group_or_default
    for layer in model.decoder.layers:
        dispatcher = getattr(layer.mlp, "token_dispatcher", None)
        for name in _HOST_SYNC_METHODS if dispatcher is not None else ():
            setattr(dispatcher, name, torch.compiler.disable(getattr(dispatcher, name)))
        layer.compile(dynamic=False)
    return len(model.decoder.layers)
