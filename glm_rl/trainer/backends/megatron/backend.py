"""Megatron trainer backend for the RL loop: GLM-4.5 as a megatron-core GPTModel with TP (+SP), EP and DP.

Same interface as `TorchBackend` (`logprobs`, `train_step`, `named_tensors`, `save` / `load`), so the loop,
algorithms and metrics are shared. Choices, and why:
- One rank per process; Megatron's parallel state is built here from the config's `ParallelLayout` (DP =
  world / TP). Every TP peer of a DP rank receives the same samples (trainer/group.py), so all run the same
  micro-batches. PP / CP are refused at parse time (config.py): not wired into this loop yet.
- On CUDA the model is built with `fast=True` (fast_modules.py: grouped-GEMM experts, SDPA attention; same
  parameters, 4.2× the local spec's training throughput on an H100). CPU runs keep megatron's reference modules,
  whose summation order the TP/EP parity tests pin to 1e-5 (fast_modules has its own parity test).
- Logprobs and entropy come straight from the vocab-parallel logits (B, T, V/TP) through logprobs.py (row
  chunks, max / sums all-reduced over TP, no fp32 copy of the logits); the full vocab is never gathered.
- With SP the sequence is cut over TP inside the model: micro-batches are right-padded to a multiple of TP.
- Expert all-to-alls are collectives across DP ranks: every rank runs the same number of micro-batches (the
  rank with fewer runs zero-loss pad batches), forward and backward.
- Gradient sums, clipping and the optimizer: optim.py (megatron's finalize_model_grads rules without its DDP
  wrapper; plain AdamW, or fp32 master copies with --optimizer-cpu-offload / --use-precision-aware-optimizer).
- Routing replay (R2 / R3) uses megatron-core's RouterReplay (replay.py), on the decoder's routers.
- `--enable-mtp-training`: the model carries the MTP layer (imported from the checkpoint as the engine loads it);
  megatron adds its loss on the response tokens through MTPLossAutoScaler, scaled per micro-batch like the
  policy loss, with `mtp_detach_heads` so the backbone's gradients are unchanged (tested); its weights go out
  with every sync (the engines run `--enable-mtp`). Reported: `train/mtp_loss`, `train/mtp_accuracy`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from glm_rl.config import AlgoConfig, ModelConfig, TrainConfig
from glm_rl.rollout.samples import Sample
from glm_rl.trainer.backends.base import PolicyBackend
from glm_rl.trainer.backends.megatron.logprobs import vocab_parallel_logprobs
from glm_rl.trainer.backends.megatron.optim import Optimizer, reduce_grads_and_clip
from glm_rl.trainer.backends.megatron.replay import MegatronRoutingReplay
from glm_rl.trainer.backends.torch_backend import loss_config
from glm_rl.trainer.batching import MicroBatch, collate, pack_micro_batches


def init_parallel(train_cfg: TrainConfig, seed: int) -> None:
    """Megatron parallel state + model-parallel RNG on the initialised default group (model.py applies the CPU
    shims first)."""
    from glm_rl.trainer.backends.megatron.model import setup_model_parallel

    lay = train_cfg.layout()
    setup_model_parallel(tp=lay.tp, ep=lay.ep, pp=lay.pp, cp=lay.cp, etp=lay.etp, seed=seed)


def _model_overrides(t: TrainConfig) -> dict:
    """TransformerConfig fields the train flags set (build_gpt_model passes them through)."""
    over = dict(sequence_parallel=t.sequence_parallel_on, moe_token_dispatcher_type=t.moe_token_dispatcher_type)
    if t.moe_enable_deepep:
        over["moe_flex_dispatcher_backend"] = "deepep"
    if t.recompute_granularity:
        over |= dict(recompute_granularity=t.recompute_granularity, recompute_method=t.recompute_method,
                     recompute_num_layers=t.recompute_num_layers)
    return over


class MegatronBackend(PolicyBackend):
    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, algo: AlgoConfig, *, temperature: float,
                 seed: int = 1234, device: str = "cpu") -> None:
        from megatron.core import parallel_state as ps
        from glm_rl.models.checkpoint import check_matches_preset, load_hf_model, read_spec
        from glm_rl.trainer.backends.megatron.bridge import import_hf_weights
        from glm_rl.trainer.backends.megatron.model import build_gpt_model

        ckpt = model_cfg.hf_checkpoint
        self.spec = check_matches_preset(ckpt, model_cfg.model_preset) if model_cfg.model_preset else read_spec(ckpt)
        init_parallel(train_cfg, seed)
        self.cfg, self.algo, self.device = train_cfg, algo, device
        self.dtype = getattr(torch, model_cfg.dtype)
        self.temperature = temperature if temperature > 0 else 1.0
        self.loss_cfg = loss_config(algo)
        self.tp, self.tp_rank, self.tp_group = (ps.get_tensor_model_parallel_world_size(),
                                                ps.get_tensor_model_parallel_rank(),
                                                ps.get_tensor_model_parallel_group())
        self.sp = train_cfg.sequence_parallel_on
        hf, tokenizer = load_hf_model(ckpt, dtype=self.dtype)  # the HF model: the one reader of the checkpoint
        hf_state, self.pad_id = hf.state_dict(), tokenizer.pad_token_id
        self.mtp_training = train_cfg.enable_mtp_training
        mtp_state = {}
        if self.mtp_training:  # HF's model ignores the MTP layer's tensors: load them as the engine does
            from glm_rl.models.checkpoint import load_mtp
            from glm_rl.rollout.engines.speculative import mtp_named_tensors

            mtp_state = {k: v.detach().clone() for k, v in
                         mtp_named_tensors(load_mtp(hf), self.spec.num_hidden_layers).items()}
        # the engine's dtype per tensor: megatron keeps torch norms in fp32 under bf16, HF (and so the engine) not
        self.hf_dtypes = {name: t.dtype for name, t in {**hf_state, **mtp_state}.items()}
        replay = algo.use_rollout_routing_replay or algo.use_routing_replay

        def build(routing_replay: bool, mtp: bool = False):
            # MTP training: megatron's `mtp_detach_heads` feeds the MTP layer detached hidden states, embeddings
            # and LM-head weight, so its loss trains the MTP layer alone (the backbone's gradients are unchanged)
            over = dict(mtp_loss_scaling_factor=train_cfg.mtp_loss_scaling_factor, mtp_detach_heads=True) if mtp else {}
            model = build_gpt_model(self.spec, tp=self.tp, ep=ps.get_expert_model_parallel_world_size(),
                                    params_dtype=self.dtype, moe_enable_routing_replay=routing_replay,
                                    fast=device.startswith("cuda"), mtp=mtp, **over,
                                    **_model_overrides(train_cfg))
            import_hf_weights(model, self.spec, {**hf_state, **mtp_state} if mtp else hf_state)
            return model.to(device)

        self.model = build(replay, mtp=self.mtp_training).train()
        self._mtp_batches = 0
        # the decoder's routers only: the engine's routing (R3) covers the main layers, not the MTP layer's
        self.replay = MegatronRoutingReplay(self.model.decoder, self.spec.num_experts_per_tok, tp_rank=self.tp_rank,
                                            tp_size=self.tp, tp_group=self.tp_group, sequence_parallel=self.sp)
        self.ref_model = build(False).requires_grad_(False) if algo.kl_loss_coef > 0 else None
        del hf, hf_state, mtp_state
        self.opt = Optimizer(self.model, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                             betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
                             cpu_offload=train_cfg.optimizer_cpu_offload,
                             fp32_master=train_cfg.use_precision_aware_optimizer)

    def dp_coords(self) -> tuple[int, bool]:
        """(data-parallel rank = the sample shard this rank trains on, whether it reports for its DP rank)."""
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_rank(), self.tp_rank == 0

    # -- forward ---------------------------------------------------------------------------------------------
    def _forward(self, model, mb: MicroBatch, with_entropy: bool = False):
        """(logp (B, T), entropy (B, T) | None) of the targets under temperature, from vocab-parallel logits
        (logprobs.py: chunked, no fp32 copy of the logits, the full vocab never gathered)."""
        ids = mb.input_ids.to(self.device)
        pos = torch.arange(ids.shape[1], device=self.device).expand_as(ids)
        # (B, T, V/TP); Megatron's padded vocab rows carry a fixed -1e4 logit (model.py): no probability mass
        # MTP training: the MTP loss (megatron adds it through MTPLossAutoScaler) covers the response tokens only
        mtp_mask = mb.loss_mask.to(self.device) if self.mtp_training and model.training else None
        logits = model(ids, pos, attention_mask=None, loss_mask=mtp_mask)
        logp, entropy = vocab_parallel_logprobs(logits, mb.targets.to(self.device), temperature=self.temperature,
                                                vocab_start=self.tp_rank * logits.shape[-1],
                                                group=self.tp_group if self.tp > 1 else None)
        return logp, (entropy if with_entropy else None)

    def _micro_batches(self, samples: list[Sample], phase: str) -> list[MicroBatch]:
        """Packed by --max-tokens-per-gpu, padded for SP, and topped up with pad batches so every rank runs as
        many as the busiest one (expert all-to-alls are collectives)."""
        routing = self._routing_field(phase)
        multiple = self.tp if self.sp else 1
        mbs = [_pad_to(collate(g, self.pad_id, routing), multiple, self.pad_id)
               for g in pack_micro_batches(samples, self.cfg.max_tokens_per_gpu)]
        count = torch.tensor([len(mbs)], device=self.device)  # on the device: NCCL reduces device tensors only
        if dist.is_initialized():
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
        k = (self.replay.num_moe_layers, self.spec.num_experts_per_tok) if routing else None
        return mbs + [_pad_batch(multiple, self.pad_id, k) for _ in range(int(count) - len(mbs))]

    def _count(self, agree: int, total: int) -> tuple[int, int]:
        """Replay agreement summed over TP peers (SP splits a sample's tokens), so every peer reports its DP
        group's whole count."""
        if self.tp == 1:
            return agree, total
        t = torch.tensor([agree, total], dtype=torch.long, device=self.device)
        dist.all_reduce(t, group=self.tp_group)
        return tuple(t.tolist())

    def _on_empty_batch(self, logp: torch.Tensor) -> None:
        (logp.sum() * 0.0).backward()  # a pad batch: the expert all-to-alls must still run on every rank

    def _before_backward(self, share: float) -> None:
        if self.mtp_training:  # weight the MTP loss like the policy loss: by the micro-batch's token share
            from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

            MTPLossAutoScaler.set_loss_scale(torch.tensor(share, device=self.device))
            self._mtp_batches += share > 0

    def train_step(self, samples: list[Sample], global_tokens: int) -> dict[str, float]:
        out = super().train_step(samples, global_tokens)
        if self.mtp_training:
            from glm_rl.trainer.backends.megatron.model import take_mtp_metrics

            if mtp := take_mtp_metrics(self._mtp_batches):
                out["train/mtp_loss"] = float(mtp["loss"].mean())
                # top-1 accuracy of the MTP head on t+2 (what speculative decoding's acceptance rests on)
                out["train/mtp_accuracy"] = float(mtp["accuracy"])
            self._mtp_batches = 0
        return out

    def _zero_grads(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    def _reduce_grads_and_clip(self) -> float:
        return reduce_grads_and_clip(self.model, self.cfg.clip_grad, self.device)

    # -- weights / checkpoints -----------------------------------------------------------------------------------
    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) for every weight the engine loads. Collective: every rank must call it (the
        export gathers over TP and EP); every rank gets the same list. Replicated tensors may be views of the
        model's weights (as TorchBackend's state_dict): read them before the next optimizer step. Each tensor
        has the HF model's dtype for it (what the engine holds and verifies against)."""
        from glm_rl.trainer.backends.megatron.bridge import export_hf_weights

        return [(n, t.to(self.hf_dtypes[n])) for n, t in export_hf_weights(self.model, self.spec)]

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}, path / "trainer.pt")

    def load(self, path: Path) -> None:
        state = torch.load(path / "trainer.pt", map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])


def _pad_to(mb: MicroBatch, multiple: int, pad_id: int) -> MicroBatch:
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
    return replace(mb, input_ids=pad(mb.input_ids, pad_id), targets=pad(mb.targets, pad_id),
                   valid=pad(mb.valid, False), loss_mask=pad(mb.loss_mask, 0.0),
                   rollout_logp=pad(mb.rollout_logp, 0.0), advantages=pad(mb.advantages, 0.0),
                   routed_experts=routed, extra={k: pad(v, 0.0) for k, v in mb.extra.items()})


def _pad_batch(length: int, pad_id: int, routing: tuple[int, int] | None) -> MicroBatch:
    """A one-row micro-batch of pad tokens with no loss: keeps this rank in step with the others."""
    zeros = torch.zeros((1, length))
    ids = torch.full((1, length), pad_id, dtype=torch.long)
    routed = None
    if routing:
        routed = torch.zeros((1, length, *routing), dtype=torch.long)
        routed[:] = torch.arange(routing[1])
    return MicroBatch([], ids, ids.clone(), torch.zeros((1, length), dtype=torch.bool), zeros, zeros.clone(),
                      zeros.clone(), routed, {"old_logprobs": zeros.clone()})
