"""GLM-4.5 as a megatron-core `GPTModel`, built from a `ModelSpec` (the one source of truth).

Every architecture number comes from the spec; the Megatron-only choices are made here, once:
- sigmoid router scored in fp32, expert bias on (`e_score_correction_bias`), bias update rate 0 and aux-loss
  coefficient 0 (RL keeps routing fixed), top-k scaling `routed_scaling_factor`. Megatron always renormalises
  the top-k sigmoid probabilities when top-k > 1, which equals GLM's `norm_topk_prob=True`: any other spec
  is refused rather than silently computed differently. So is `n_group > 1`: Megatron's group-limited routing
  scores groups differently from HF (which sums the top-2 per group); GLM-4.5 uses one group.
- shared expert of `n_shared_experts × moe_intermediate_size`; first-k dense layers via `moe_layer_freq`.
- QK RMSNorm, partial RoPE (`rotary_percent`, non-interleaved, HF's `rotate_half` on the first dims), GQA,
  bias on Q/K/V only, untied embeddings.
- local (non Transformer-Engine) layer spec: TE cannot be installed on the CPU CI nor on the GPU box
  (FACTS.md); its routed experts are `SequentialMLP` (`local_experts.N.linear_fc1/fc2`).

Parallel layout comes from megatron's `parallel_state` (initialised by the caller); TP>1 turns sequence
parallel on, which megatron requires for MoE with TP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm_rl.models.presets import ModelSpec


class MegatronLayoutError(ValueError):
    """A spec / parallel layout this backend cannot build; the message names the numbers."""


def check_spec(spec: ModelSpec, tp: int = 1, ep: int = 1) -> None:
    """Refuse specs Megatron would compute differently from HF, and layouts that cannot shard."""
    if not spec.norm_topk_prob and spec.num_experts_per_tok > 1:
        raise MegatronLayoutError("norm_topk_prob=False: Megatron's sigmoid router always renormalises top-k")
    if spec.n_group != 1:
        raise MegatronLayoutError(f"n_group={spec.n_group}: group-limited routing differs from HF's; only 1 is built")
    if spec.hidden_act != "silu":
        raise MegatronLayoutError(f"hidden_act {spec.hidden_act!r}: only silu (SwiGLU) is built")
    for name, value in (("num_attention_heads", spec.num_attention_heads),
                        ("num_key_value_heads", spec.num_key_value_heads), ("vocab_size", spec.vocab_size)):
        if value % tp:
            raise MegatronLayoutError(f"{name}={value} is not divisible by tensor parallel size {tp}")
    if spec.n_routed_experts % ep:
        raise MegatronLayoutError(f"n_routed_experts={spec.n_routed_experts} is not divisible by "
                                  f"expert parallel size {ep}")


def transformer_config(spec: ModelSpec, *, tp: int = 1, ep: int = 1, params_dtype: torch.dtype = torch.float32,
                       **overrides):
    """The megatron `TransformerConfig` for `spec` (`overrides` are passed through, e.g. recompute flags)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_spec(spec, tp, ep)
    fields = dict(
        num_layers=spec.num_hidden_layers, hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.intermediate_size, num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_key_value_heads, kv_channels=spec.head_dim,
        normalization="RMSNorm", layernorm_epsilon=spec.rms_norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=spec.attention_bias,
        qk_layernorm=spec.use_qk_norm, hidden_dropout=0.0, attention_dropout=0.0,
        # MoE
        num_moe_experts=spec.n_routed_experts, moe_router_topk=spec.num_experts_per_tok,
        moe_ffn_hidden_size=spec.moe_intermediate_size,
        moe_shared_expert_intermediate_size=spec.n_shared_experts * spec.moe_intermediate_size or None,
        moe_layer_freq=[0] * spec.first_k_dense_replace + [1] * spec.num_moe_layers,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.0,
        moe_router_topk_scaling_factor=spec.routed_scaling_factor, moe_router_dtype="fp32",
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False,
        # parallel / precision / kernels
        tensor_model_parallel_size=tp, sequence_parallel=tp > 1, expert_model_parallel_size=ep,
        params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=True, transformer_impl="local",
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_gpt_model(spec: ModelSpec, *, tp: int = 1, ep: int = 1, params_dtype: torch.dtype = torch.float32,
                    pre_process: bool = True, post_process: bool = True, **overrides):
    """A GLM-4.5 `GPTModel` for the current megatron parallel state (whole model: no PP split here yet)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    config = transformer_config(spec, tp=tp, ep=ep, params_dtype=params_dtype, **overrides)
    layer_spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    return GPTModel(
        config=config, transformer_layer_spec=layer_spec, vocab_size=spec.vocab_size,
        max_sequence_length=spec.max_position_embeddings, pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=spec.tie_word_embeddings, position_embedding_type="rope",
        rotary_percent=spec.partial_rotary_factor, rotary_base=int(spec.rope_theta),
    )


def setup_model_parallel(*, tp: int = 1, ep: int = 1, seed: int = 1234) -> None:
    """Megatron parallel state + RNG on an already initialised torch.distributed group; on a host without
    CUDA the CPU/gloo shims are applied first (explicitly, here — never on import)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from glm_rl.trainer.backends.megatron.cpu_shims import apply_cpu_shims

    apply_cpu_shims()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(seed)
