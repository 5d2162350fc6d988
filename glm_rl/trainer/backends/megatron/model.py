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

Parallel layout comes from megatron's `parallel_state` (initialised by `setup_model_parallel`): PP / CP /
expert-TP sizes are read from it, so callers only pass TP and EP (as before) plus the uneven pipeline split.
- TP>1 turns sequence parallel on, which megatron requires for MoE with TP.
- PP: megatron builds this stage's slice of layers (`pre_process` / `post_process` from the stage) and numbers
  them from the config's offset; the MTP layer sits on the last stage.
- CP: the local spec's attention refuses CP, so every layer's core attention is swapped for
  `cp_attention.ContextParallelAttention` when CP > 1.
- Vocab: padded to a multiple of 128 × TP (`glm_rl.parallel.padded_vocab_size`), as Megatron does. The padded
  rows are zero and their logits are pinned to `PADDED_VOCAB_LOGIT` by a hook on the output layer, so a padded id
  never wins an argmax or takes softmax mass, yet no NaN appears (−inf would give 0 · −inf in entropies).
  Consumers that want exactly HF's vocab slice the gathered logits to `spec.vocab_size`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm_rl.models.glm45.presets import ModelSpec
from glm_rl.parallel import padded_vocab_size

PADDED_VOCAB_LOGIT = -1e4  # logit of a padded vocab id: exp(-1e4 - max) is 0 in fp32 and bf16, and finite


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
    for name, value in (
        ("num_attention_heads", spec.num_attention_heads),
        ("num_key_value_heads", spec.num_key_value_heads),
    ):
        if value % tp:
            raise MegatronLayoutError(f"{name}={value} is not divisible by tensor parallel size {tp}")
    if spec.n_routed_experts % ep:
        raise MegatronLayoutError(
            f"n_routed_experts={spec.n_routed_experts} is not divisible by expert parallel size {ep}"
        )


def _state_sizes() -> dict[str, int | None]:
    """PP / CP / expert-TP sizes from megatron's parallel state (1 / 1 / None when it is not initialised)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {"pp": 1, "cp": 1, "etp": None}
    return {
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
        "etp": ps.get_expert_tensor_parallel_world_size(),
    }


def _dense_fields(spec: ModelSpec) -> dict:
    """TransformerConfig fields of the dense architecture: sizes, RMSNorm, SwiGLU, QK norm, no dropout."""
    return dict(
        num_layers=spec.num_hidden_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.intermediate_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_key_value_heads,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.attention_bias,
        qk_layernorm=spec.use_qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )


def _moe_fields(spec: ModelSpec) -> dict:
    """TransformerConfig fields of the MoE layers: fp32 sigmoid router with a frozen expert bias, no aux loss."""
    return dict(
        num_moe_experts=spec.n_routed_experts,
        moe_router_topk=spec.num_experts_per_tok,
        moe_ffn_hidden_size=spec.moe_intermediate_size,
        moe_shared_expert_intermediate_size=spec.n_shared_experts * spec.moe_intermediate_size or None,
        moe_layer_freq=[0] * spec.first_k_dense_replace + [1] * spec.num_moe_layers,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=0.0,
        moe_router_topk_scaling_factor=spec.routed_scaling_factor,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
    )


def _parallel_fields(
    tp: int, ep: int, params_dtype: torch.dtype, first_stage_layers: int | None, last_stage_layers: int | None
) -> dict:
    """TransformerConfig fields of the parallel layout (PP / CP / expert-TP from megatron's parallel state),
    precision, and the local (non-fused) kernels."""
    sizes = _state_sizes()
    return dict(
        tensor_model_parallel_size=tp,
        sequence_parallel=tp > 1,
        expert_model_parallel_size=ep,
        pipeline_model_parallel_size=sizes["pp"],
        context_parallel_size=sizes["cp"],
        expert_tensor_parallel_size=sizes["etp"],
        num_layers_in_first_pipeline_stage=first_stage_layers,
        num_layers_in_last_pipeline_stage=last_stage_layers,
        pipeline_dtype=params_dtype if sizes["pp"] > 1 else None,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=True,
        transformer_impl="local",
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def transformer_config(
    spec: ModelSpec,
    *,
    tp: int = 1,
    ep: int = 1,
    params_dtype: torch.dtype = torch.float32,
    mtp: bool = False,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
    **overrides,
):
    """The megatron `TransformerConfig` for `spec`. PP / CP / expert-TP come from megatron's parallel state;
    `first_stage_layers` / `last_stage_layers` are --decoder-first/last-pipeline-num-layers; `mtp` builds the
    spec's MTP layers; `overrides` are passed through (e.g. recompute flags)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_spec(spec, tp, ep)
    fields = {
        **_dense_fields(spec),
        **_moe_fields(spec),
        # MTP (GLM-4.5's next-n layer, on the last pipeline stage)
        "mtp_num_layers": spec.num_nextn_predict_layers if mtp and spec.num_nextn_predict_layers else None,
        **_parallel_fields(tp, ep, params_dtype, first_stage_layers, last_stage_layers),
    }
    fields.update(overrides)
    return TransformerConfig(**fields)


def _block_spec(config, fast: bool = False):
    """This stage's local-spec layer specs; core attention swapped for the CP one when CP > 1; with `fast`,
    grouped-GEMM experts and SDPA attention (fast_modules.py: same parameters, same numbers)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from glm_rl.trainer.backends.megatron.cp_attention import ContextParallelAttention

    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    if fast:
        from glm_rl.trainer.backends.megatron.fast_modules import fast_block_spec

        fast_block_spec(block)
    if config.context_parallel_size > 1:
        for layer in block.layer_specs:
            layer.submodules.self_attention.submodules.core_attention = ContextParallelAttention
    return block


def build_gpt_model(
    spec: ModelSpec,
    *,
    tp: int = 1,
    ep: int = 1,
    params_dtype: torch.dtype = torch.float32,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    mtp: bool = False,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
    fast: bool = False,
    **overrides,
):
    """This pipeline stage's GLM-4.5 `GPTModel` (the whole model without PP). `pre_process` / `post_process`
    default to this rank's stage being first / last; the vocab is padded for TP (module docstring)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    config = transformer_config(
        spec,
        tp=tp,
        ep=ep,
        params_dtype=params_dtype,
        mtp=mtp,
        first_stage_layers=first_stage_layers,
        last_stage_layers=last_stage_layers,
        **overrides,
    )
    block = _block_spec(config, fast)
    mtp_spec = get_gpt_mtp_block_spec(config, block, use_transformer_engine=False) if mtp else None
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    model = GPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=padded_vocab_size(spec, tp),
        max_sequence_length=spec.max_position_embeddings,
        pre_process=first if pre_process is None else pre_process,
        post_process=last if post_process is None else post_process,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=spec.partial_rotary_factor,
        rotary_base=int(spec.rope_theta),
        mtp_block_spec=mtp_spec,
    )
    if model.post_process:
        _mask_padded_vocab(model.output_layer, spec.vocab_size, padded_vocab_size(spec, tp) // tp)
    return model


def _mask_padded_vocab(output_layer: torch.nn.Module, vocab_size: int, local_vocab: int) -> None:
    """Pin the logits of padded vocab ids (global id >= vocab_size) to PADDED_VOCAB_LOGIT, on this TP rank's
    shard (B, T, V/TP) or on gathered logits (`runtime_gather_output`). Main and MTP logits both go through this
    layer; constant logits give the padded rows no gradient, so they stay zero."""
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    if local_vocab * tp == vocab_size:
        return

    def hook(module, args, output):
        logits, bias = output  # (S, B, width)
        width = logits.shape[-1]
        start = 0 if width == local_vocab * tp else rank * local_vocab
        n_real = max(0, min(width, vocab_size - start))
        pad = logits.new_full((*logits.shape[:-1], width - n_real), PADDED_VOCAB_LOGIT)
        return torch.cat([logits[..., :n_real], pad], dim=-1), bias

    output_layer.register_forward_hook(hook)


def setup_model_parallel(
    *, tp: int = 1, ep: int = 1, pp: int = 1, cp: int = 1, etp: int | None = None, seed: int = 1234
) -> None:
    """Megatron parallel state + RNG on an already initialised torch.distributed group (world = TP×PP×CP×DP;
    `etp` None keeps Megatron's default, expert-TP = TP). Norms under sequence parallelism are patched (on GPU
    too); on a host without CUDA the CPU/gloo shims are applied first (explicitly, here — never on import)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from glm_rl.trainer.backends.megatron.cpu_shims import apply_cpu_shims, apply_norm_sequence_parallel_patch

    apply_cpu_shims()
    apply_norm_sequence_parallel_patch()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    model_parallel_cuda_manual_seed(seed)
