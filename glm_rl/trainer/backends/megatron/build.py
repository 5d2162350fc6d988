"""Building the Megatron policy (and reference) model from an HF checkpoint, and the micro-batch padding the
backend needs (SP / CP multiples, pad batches that keep a rank in step with the others).

Why apart from backend.py: the HF checkpoint is read once (`load_states`: the HF model is the one reader, the MTP
layer loaded as the engine loads it) and the same tensors build the policy and, with a KL loss, the reference
model (`ModelBuilder.build`); the backend then only drives the model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from glm_rl.config import MegatronConfig
from glm_rl.models.glm45.presets import ModelSpec
from glm_rl.trainer.backends.megatron.pipeline import PIPELINE_CONFIG
from glm_rl.trainer.batching import MicroBatch


@dataclass
class HFStates:
    hf: dict[str, torch.Tensor]  # the main model's tensors, HF names
    mtp: dict[str, torch.Tensor]  # the MTP layer's (checkpoint names), empty without MTP training
    pad_id: int


def load_states(ckpt: str, dtype: torch.dtype, spec: ModelSpec, *, mtp: bool) -> HFStates:
    from glm_rl.models.glm45.checkpoint import load_hf_model, load_mtp
    from glm_rl.models.glm45.hf_names import mtp_named_tensors

    hf, tokenizer = load_hf_model(ckpt, dtype=dtype)
    mtp_state = {}
    if mtp:  # HF's model ignores the MTP layer's tensors: load them as the engine does
        named = mtp_named_tensors(load_mtp(hf), spec.num_hidden_layers)
        mtp_state = {k: v.detach().clone() for k, v in named.items()}
    return HFStates(hf.state_dict(), mtp_state, tokenizer.pad_token_id)


@dataclass
class ModelBuilder:
    spec: ModelSpec
    megatron: MegatronConfig
    tp: int
    dtype: torch.dtype
    device: str
    states: HFStates
    mtp_scale: object

    def build(self, routing_replay: bool, mtp: bool = False):
        """A GPTModel with the checkpoint's weights. MTP training: megatron's `mtp_detach_heads` feeds the MTP
        layer detached hidden states, embeddings and LM-head weight, so its loss trains the MTP layer alone (the
        backbone's gradients are unchanged)."""
        from megatron.core import parallel_state as ps

        from glm_rl.trainer.backends.megatron.bridge import import_hf_weights
        from glm_rl.trainer.backends.megatron.model import build_gpt_model

        m = self.megatron
        over = {}
        if mtp:
            over = dict(
                mtp_loss_scaling_factor=m.mtp_loss_scaling_factor,
                mtp_detach_heads=True,
                mtp_grad_scale_func=self.mtp_scale,
            )
        model = build_gpt_model(
            self.spec,
            tp=self.tp,
            ep=ps.get_expert_model_parallel_world_size(),
            params_dtype=self.dtype,
            moe_enable_routing_replay=routing_replay,
            fast=self.device.startswith("cuda"),
            mtp=mtp,
            **over,
            **model_overrides(m),
        )
        states = {**self.states.hf, **self.states.mtp} if mtp else self.states.hf
        import_hf_weights(model, self.spec, states)
        return model.to(self.device)


def model_overrides(t: MegatronConfig) -> dict:
    """TransformerConfig fields the megatron flags set (build_gpt_model passes them through), plus what the
    pipeline schedule needs (pipeline.PIPELINE_CONFIG)."""
    over = dict(
        sequence_parallel=t.sequence_parallel_on,
        moe_token_dispatcher_type=t.moe_token_dispatcher_type,
        first_stage_layers=t.decoder_first_pipeline_num_layers,
        last_stage_layers=t.decoder_last_pipeline_num_layers,
        **PIPELINE_CONFIG,
    )
    if t.moe_enable_deepep:
        over["moe_flex_dispatcher_backend"] = "deepep"
    if t.recompute_granularity:
        over |= dict(
            recompute_granularity=t.recompute_granularity,
            recompute_method=t.recompute_method,
            recompute_num_layers=t.recompute_num_layers,
        )
    return over


class LossScale:
    """`mtp_grad_scale_func` for megatron's schedule, which multiplies the MTP loss by its value / the number of
    micro-batches (pipeline.py). A small object, not a bound method: megatron deep-copies the config."""

    def __init__(self, device: str) -> None:
        self.device, self.value = device, 0.0

    def __call__(self) -> torch.Tensor:
        return torch.tensor(self.value, device=self.device)


def mtp_token_counts(loss_mask: torch.Tensor, layers: int, cp_rank: int, cp: int) -> torch.Tensor:
    """(layers, 2): [this CP rank's, the whole micro-batch's] MTP tokens per MTP layer, as megatron counts them:
    with no labels given it derives them from the input ids and rolls the loss mask left once with them, then
    once more per layer — over the whole sequence under CP (zero at its end), of which rank `cp_rank` holds its
    load-balanced chunks. From the full (B, T) mask every CP peer holds: no communication."""
    from glm_rl.trainer.backends.megatron.cp_attention import split_for_cp

    counts = []
    for k in range(layers):
        rolled = torch.nn.functional.pad(loss_mask[:, k + 2 :], (0, k + 2))
        counts.append((float(split_for_cp(rolled, cp_rank, cp).sum()), float(rolled.sum())))
    return torch.tensor(counts, dtype=torch.float64)


def pad_to(mb: MicroBatch, multiple: int, pad_id: int) -> MicroBatch:
    """Right-pad every (B, T, ...) field of `mb` to T a multiple of `multiple` (pad positions are not valid)."""
    T = mb.input_ids.shape[1]
    extra = -T % multiple
    if not extra:
        return mb

    def pad(x: torch.Tensor, value) -> torch.Tensor:
        tail = torch.full((x.shape[0], extra, *x.shape[2:]), value, dtype=x.dtype)
        return torch.cat([x, tail], dim=1)

    routed = None
    if mb.routed_experts is not None:
        routed = pad(mb.routed_experts, 0)
        routed[:, T:] = torch.arange(routed.shape[-1])  # distinct ids on pad rows
    return replace(
        mb,
        input_ids=pad(mb.input_ids, pad_id),
        targets=pad(mb.targets, pad_id),
        valid=pad(mb.valid, False),
        loss_mask=pad(mb.loss_mask, 0.0),
        rollout_logp=pad(mb.rollout_logp, 0.0),
        advantages=pad(mb.advantages, 0.0),
        routed_experts=routed,
        extra={k: pad(v, 0.0) for k, v in mb.extra.items()},
    )


def pad_batch(length: int, pad_id: int, routing: tuple[int, int] | None) -> MicroBatch:
    """A one-row micro-batch of pad tokens with no loss: keeps this rank in step with the others."""
    zeros = torch.zeros((1, length))
    ids = torch.full((1, length), pad_id, dtype=torch.long)
    routed = None
    if routing:
        routed = torch.zeros((1, length, *routing), dtype=torch.long)
        routed[:] = torch.arange(routing[1])
    return MicroBatch(
        [],
        ids,
        ids.clone(),
        torch.zeros((1, length), dtype=torch.bool),
        zeros,
        zeros.clone(),
        zeros.clone(),
        routed,
        {"old_logprobs": zeros.clone()},
    )
