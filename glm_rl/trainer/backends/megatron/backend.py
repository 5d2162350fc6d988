"""Megatron trainer backend for the RL loop: GLM-4.5 as a megatron-core GPTModel with TP (+SP), EP, PP, CP, DP.

Same interface as `TorchBackend` (`logprobs`, `train_step`, `named_tensors`, `save` / `load`), so the loop,
algorithms and metrics are shared (base.py, including the per-micro-batch loss). Choices, and why:
- One rank per process; Megatron's parallel state is built here from the config's `ParallelLayout` (DP =
  world / (TP x PP x CP)). Every TP / PP / CP peer of a DP rank receives the same samples (trainer/group.py),
  so all run the same micro-batches.
- Micro-batches go through megatron's own pipeline schedule (pipeline.py; 1F1B when PP > 1, with uneven
  first / last stages from --decoder-first/last-pipeline-num-layers). Only the last stage has logits: it
  computes the logprobs and the loss, and its TP-rank-0 / CP-rank-0 rank reports (`dp_coords`); the other
  stages return well-formed, empty results.
- CP: each CP rank runs its load-balanced chunks of the sequence (right-padded to a multiple of 2 x CP;
  cp_attention.py) at their global positions, computes its chunks' logprobs, and all-gathers the whole
  (B, T) logprobs with an autograd gather whose backward keeps only its own chunks. Every CP rank then
  computes the same full-sequence loss — GSPO's sequence-level ratio stays exact, nothing per-token is
  approximated — and the CP sum of parameter gradients (optim.py, DP x CP) is the full gradient. The cost,
  a (B, T) all-gather per micro-batch, is negligible next to attention's K/V gather.
- On CUDA the model is built with `fast=True` (fast_modules.py: grouped-GEMM experts, SDPA attention; same
  parameters, 4.2× the local spec's training throughput on an H100). CPU runs keep megatron's reference modules,
  whose summation order the TP/EP parity tests pin to 1e-5 (fast_modules has its own parity test).
- Logprobs and entropy come straight from the vocab-parallel logits (B, T, V/TP) through trainer/logprobs.py (row
  chunks, max / sums all-reduced over TP, no fp32 copy of the logits); the full vocab is never gathered.
- With SP the sequence is cut over TP inside the model: micro-batches are right-padded to a multiple of TP
  (times 2 x CP with CP).
- Expert all-to-alls are collectives across DP ranks: every rank runs the same number of micro-batches (the
  rank with fewer runs zero-loss pad batches), forward and backward.
- Gradient sums, clipping and the optimizer: optim.py (megatron's finalize_model_grads rules without its DDP
  wrapper; plain AdamW, or fp32 master copies with --optimizer-cpu-offload / --use-precision-aware-optimizer).
- Routing replay (R2 / R3) uses megatron-core's RouterReplay (replay.py), on this stage's decoder routers,
  each replaying its own layers' and tokens' slice; agreement counts are summed over the ranks that split a
  sample (SP, CP, PP), so every layout reports the PP1 / CP1 figure. Activation recompute re-runs routers in
  the backward pass: they replay the same micro-batch's routing (megatron's REPLAY_BACKWARD queue).
- `--enable-mtp-training`: the model carries the MTP layer (imported from the checkpoint as the engine loads it);
  megatron adds its loss on the response tokens through MTPLossAutoScaler, scaled per micro-batch like the
  policy loss (through the schedule's `mtp_grad_scale_func`), with `mtp_detach_heads` so the backbone's
  gradients are unchanged (tested); its weights go out with every sync (the engines run `--enable-mtp`).
  Reported: `train/mtp_loss`, `train/mtp_accuracy`. With PP the MTP layer sits on the last stage with its own
  copy of the word embeddings, kept equal to the first stage's (optim.py; tested). With CP megatron normalises
  each CP rank's MTP loss by that rank's own MTP tokens; the scale is set per CP rank so the CP sum is the
  micro-batch's MTP token mean, and the metrics are summed over CP peers first: CP gives CP1's step and figures
  (`_weigh_mtp`; tested). One scale serves every MTP layer, so CP takes one MTP layer (GLM-4.5's; config/run.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from glm_rl.config import AlgoConfig, MegatronConfig, ModelConfig, RoutingReplay, TrainConfig
from glm_rl.rollout.samples import Sample
from glm_rl.trainer.backends.base import Phase, PolicyBackend
from glm_rl.trainer.backends.megatron.build import (
    LossScale,
    ModelBuilder,
    load_states,
    mtp_token_counts,
    pad_batch,
    pad_to,
)
from glm_rl.trainer.backends.megatron.optim import Optimizer, reduce_grads_and_clip
from glm_rl.trainer.backends.megatron.replay import MegatronRoutingReplay
from glm_rl.trainer.backends.torch_backend import loss_config
from glm_rl.trainer.batching import MicroBatch, collate, pack_micro_batches
from glm_rl.trainer.logprobs import vocab_parallel_logprobs


def init_parallel(megatron_cfg: MegatronConfig, world_size: int, seed: int) -> None:
    """Megatron parallel state + model-parallel RNG on the initialised default group (model.py applies the CPU
    shims first)."""
    from glm_rl.trainer.backends.megatron.model import setup_model_parallel

    lay = megatron_cfg.layout(world_size)
    setup_model_parallel(tp=lay.tp, ep=lay.ep, pp=lay.pp, cp=lay.cp, etp=lay.etp, seed=seed)


class MegatronBackend(PolicyBackend):
    """A `TrainerBackend` over megatron-core's GPTModel; `megatron_cfg` (default: one rank, no parallelism) sets
    the layout and Megatron's options."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        algo: AlgoConfig,
        *,
        megatron_cfg: MegatronConfig | None = None,
        temperature: float,
        seed: int = 1234,
        device: str = "cpu",
    ) -> None:
        from glm_rl.models.glm45.checkpoint import check_matches_preset, read_spec

        m = megatron_cfg or MegatronConfig()
        ckpt = model_cfg.hf_checkpoint
        self.spec = check_matches_preset(ckpt, model_cfg.model_preset) if model_cfg.model_preset else read_spec(ckpt)
        init_parallel(m, train_cfg.num_trainer_ranks, seed)
        self.cfg, self.algo, self.device = train_cfg, algo, device
        self.dtype = getattr(torch, model_cfg.dtype)
        self.temperature = temperature if temperature > 0 else 1.0
        self.loss_cfg = loss_config(algo)
        self._parallel_groups()
        self.sp = m.sequence_parallel_on
        self.mtp_training = m.enable_mtp_training
        self._mtp_scale = LossScale(device)  # the schedule's MTP loss scale, set per micro-batch in training
        states = load_states(ckpt, self.dtype, self.spec, mtp=self.mtp_training)
        self.pad_id = states.pad_id
        # the engine's dtype per tensor: megatron keeps torch norms in fp32 under bf16, HF (and so the engine) not
        self.hf_dtypes = {name: t.dtype for name, t in {**states.hf, **states.mtp}.items()}
        builder = ModelBuilder(
            self.spec, m, tp=self.tp, dtype=self.dtype, device=device, states=states, mtp_scale=self._mtp_scale
        )
        self.model = builder.build(algo.routing_replay is not RoutingReplay.OFF, mtp=self.mtp_training).train()
        self.mtp_layers = self.model.config.mtp_num_layers or 0
        self._mtp_batches, self._mtp_figures = 0, []  # this step's: see _weigh_mtp
        # this stage's decoder routers only: the engine's routing (R3) covers the main layers, not the MTP layer's
        self.replay = MegatronRoutingReplay(
            self.model.decoder,
            self.spec.num_experts_per_tok,
            tp_rank=self.tp_rank,
            tp_size=self.tp,
            tp_group=self.tp_group,
            sequence_parallel=self.sp,
            cp_group=self.cp_group,
            pp_group=self.pp_group,
            device=device,
        )
        self.ref_model = builder.build(False).requires_grad_(False) if algo.kl_loss_coef > 0 else None
        del builder, states
        self.opt = Optimizer(
            self.model,
            lr=train_cfg.lr,
            weight_decay=train_cfg.weight_decay,
            betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
            cpu_offload=m.optimizer_cpu_offload,
            fp32_master=m.use_precision_aware_optimizer,
        )

    def _parallel_groups(self) -> None:
        """This rank's TP / CP / PP sizes, ranks and groups, from megatron's parallel state."""
        from megatron.core import parallel_state as ps

        self.tp, self.tp_rank, self.tp_group = (
            ps.get_tensor_model_parallel_world_size(),
            ps.get_tensor_model_parallel_rank(),
            ps.get_tensor_model_parallel_group(),
        )
        self.cp, self.cp_group = ps.get_context_parallel_world_size(), ps.get_context_parallel_group()
        self.cp_rank = ps.get_context_parallel_rank()
        self.pp_group = ps.get_pipeline_model_parallel_group()

    def dp_coords(self) -> tuple[int, bool]:
        """(data-parallel rank = the sample shard this rank trains on, whether it reports for its DP rank): the
        last pipeline stage's TP-rank-0, CP-rank-0 rank reports (only the last stage has logprobs)."""
        from megatron.core import parallel_state as ps

        lead = self.tp_rank == 0 and ps.get_context_parallel_rank() == 0 and ps.is_pipeline_last_stage()
        return ps.get_data_parallel_rank(), lead

    # -- forward ---------------------------------------------------------------------------------------------
    def _stage_forward(self, model, mb: MicroBatch, phase: str | None) -> torch.Tensor:
        """This stage's forward of `mb`'s CP chunks (the schedule has set its input on later stages), with the
        micro-batch's routing replay set first (`phase` None: none). Last stage: logits (B, T/CP, V/TP);
        Megatron's padded vocab rows carry a fixed -1e4 logit (model.py), so no probability mass."""
        from glm_rl.trainer.backends.megatron.cp_attention import split_for_cp

        if phase is not None:
            self._set_replay(mb, phase)
        rank = self.cp_group.rank()
        ids = mb.input_ids.to(self.device)
        pos = split_for_cp(torch.arange(ids.shape[1], device=self.device).expand_as(ids), rank, self.cp)
        # MTP training: the MTP loss (megatron adds it through MTPLossAutoScaler) covers the response tokens only
        mtp_mask = mb.loss_mask.to(self.device) if self.mtp_training and model.training else None
        out = model(
            split_for_cp(ids, rank, self.cp),
            pos,
            attention_mask=None,
            loss_mask=None if mtp_mask is None else split_for_cp(mtp_mask, rank, self.cp),
        )
        if phase is not None:
            self.replay.forward_done()
        return out

    def _logprobs(self, logits: torch.Tensor, mb: MicroBatch, with_entropy: bool):
        """(logp (B, T), entropy (B, T) | None) of the targets under temperature, from this CP rank's
        vocab-parallel logits (trainer/logprobs.py: chunked, no fp32 copy, the full vocab never gathered), gathered over
        CP with a gradient that returns to this rank's chunks only (module docstring)."""
        from glm_rl.trainer.backends.megatron.cp_attention import gather_from_cp_with_grad, split_for_cp

        targets = split_for_cp(mb.targets.to(self.device), self.cp_group.rank(), self.cp)
        logp, entropy = vocab_parallel_logprobs(
            logits,
            targets,
            temperature=self.temperature,
            vocab_start=self.tp_rank * logits.shape[-1],
            group=self.tp_group if self.tp > 1 else None,
        )
        logp = gather_from_cp_with_grad(logp, self.cp_group)
        return logp, (gather_from_cp_with_grad(entropy, self.cp_group) if with_entropy else None)

    def _forward_pass(self, model, mbs: list[MicroBatch], phase: str | None):
        """Forward only through the pipeline; logprobs on the last stage (None elsewhere), R2's record gathered
        over SP / CP / stages after the schedule (collectives inside it would interleave with its p2p)."""
        from glm_rl.trainer.backends.megatron.pipeline import run_micro_batches

        recorded = []

        def forward(mb: MicroBatch) -> torch.Tensor:
            out = self._stage_forward(model, mb, phase)
            if phase is not None and self.replay.mode == "record":
                recorded.append(self.replay.recorded_local())
            return out

        def loss(mb: MicroBatch, logits: torch.Tensor):
            logp, _ = self._logprobs(logits, mb, with_entropy=False)
            return logp.sum() * 0.0, logp

        logps = run_micro_batches(model, mbs, forward, loss, forward_only=True) or [None] * len(mbs)
        routing = [self.replay.gather(r).to(torch.int16).cpu().numpy() for r in recorded] or [None] * len(mbs)
        return list(zip(logps, routing))

    def _train_pass(self, mbs: list[MicroBatch], loss_fn, with_entropy: bool) -> None:
        from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

        from glm_rl.trainer.backends.megatron.pipeline import run_micro_batches

        MTPLossLoggingHelper.clean_metrics_in_tracker()  # _weigh_mtp reads what each micro-batch adds

        def loss(mb: MicroBatch, logits: torch.Tensor):
            logp, entropy = self._logprobs(logits, mb, with_entropy)
            if self.mtp_training:
                self._weigh_mtp(mb, len(mbs))
            return loss_fn(logp, entropy, mb), None

        run_micro_batches(
            self.model, mbs, lambda mb: self._stage_forward(self.model, mb, "train"), loss, forward_only=False
        )

    def _weigh_mtp(self, mb: MicroBatch, num_micro_batches: int) -> None:
        """After `mb`'s forward on the last stage, before its backward: set its MTP backward scale and keep this
        rank's MTP figures for it. Megatron backpropagates `value` / num_micro_batches x mtp_loss_scaling_factor x
        S_r / n_r on CP rank r (S_r: its MTP loss token-sum, n_r: its MTP tokens). We want the micro-batch's MTP
        token mean weighted like the policy loss, by its token share: share x factor x sum_r S_r / n, n = sum_r n_r.
        So value_r = share x num_micro_batches x n_r / n (without CP n_r = n). A CP rank with n_r = 0 has S_r = 0."""
        from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

        share = float(mb.loss_mask.sum()) / self._global_tokens
        counts = mtp_token_counts(mb.loss_mask, self.mtp_layers, self.cp_rank, self.cp)  # (layer, [own, all])
        own, whole = counts[0].tolist()  # one scale serves all layers: the config refuses >1 MTP layer with CP
        self._mtp_scale.value = share * num_micro_batches * own / max(whole, 1.0)
        self._mtp_batches += share > 0
        # megatron's tracker now holds this micro-batch's figures on this rank: per layer its MTP token mean
        # (S_r / n_r), correct top-1 predictions and tokens; kept as sums, which add up over CP peers
        tracker = MTPLossLoggingHelper.tracker
        own_tokens = counts[:, 0].to(tracker["loss_values"])
        self._mtp_figures.append(
            torch.stack(
                [tracker["loss_values"] * own_tokens, own_tokens, tracker["correct_values"], tracker["total_values"]],
                dim=1,
            )
        )
        MTPLossLoggingHelper.clean_metrics_in_tracker()

    def _take_mtp_metrics(self) -> dict[str, float]:
        """This step's `train/mtp_loss` (per MTP layer, the mean over micro-batches with loss tokens of each one's
        MTP token mean; then the mean over layers) and `train/mtp_accuracy` (top-1 on t+2 over all MTP tokens), the
        CP peers' sums added first so every CP size reports CP1's figures. Empty off the last stage."""
        figures, batches = self._mtp_figures, self._mtp_batches
        self._mtp_figures, self._mtp_batches = [], 0
        if not figures or not batches:  # the same on every CP peer (full-row counts, same micro-batches)
            return {}
        f = torch.stack(figures)  # (micro-batch, layer, [loss token-sum, tokens, correct, total])
        if self.cp > 1:
            dist.all_reduce(f, group=self.cp_group)
        loss = (f[..., 0] / f[..., 1].clamp(min=1)).sum(0) / batches
        return {
            "train/mtp_loss": float(loss.mean()),
            # top-1 accuracy of the MTP head on t+2 (what speculative decoding's acceptance rests on)
            "train/mtp_accuracy": float(f[..., 2].sum() / f[..., 3].sum().clamp(min=1)),
        }

    def _micro_batches(self, samples: list[Sample], phase: Phase) -> list[MicroBatch]:
        """Packed by --max-tokens-per-gpu, padded for SP and CP, and topped up with pad batches so every rank runs
        as many as the busiest one (expert all-to-alls are collectives)."""
        routing = self._routing_source(phase)
        multiple = (self.tp if self.sp else 1) * (2 * self.cp if self.cp > 1 else 1)
        mbs = [
            pad_to(collate(g, self.pad_id, routing), multiple, self.pad_id)
            for g in pack_micro_batches(samples, self.cfg.max_tokens_per_gpu)
        ]
        count = torch.tensor([len(mbs)], device=self.device)  # on the device: NCCL reduces device tensors only
        if dist.is_initialized():
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
        k = (self.replay.num_moe_layers, self.spec.num_experts_per_tok) if routing is not None else None
        return mbs + [pad_batch(multiple, self.pad_id, k) for _ in range(int(count) - len(mbs))]

    def _count(self, agree: int, total: int) -> tuple[int, int]:
        """Replay agreement summed over the ranks that split a DP rank's work — SP peers (tokens), CP peers
        (tokens), pipeline stages (layers) — so every rank reports its DP rank's whole count."""
        t = torch.tensor([agree, total], dtype=torch.long, device=self.device)
        for group, split in (
            (self.tp_group, self.sp and self.tp > 1),
            (self.cp_group, self.cp > 1),
            (self.pp_group, self.pp_group.size() > 1),
        ):
            if split:
                dist.all_reduce(t, group=group)
        return tuple(t.tolist())

    def train_step(self, samples: list[Sample], global_tokens: int) -> dict[str, float]:
        self._global_tokens = global_tokens
        out = super().train_step(samples, global_tokens)
        return (out | self._take_mtp_metrics()) if self.mtp_training else out

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

    def is_sync_source(self) -> bool:
        """One rank per pipeline stage sends that stage (TP-, CP- and DP-rank 0; EP ranks are DP ranks), as
        slime does: no stage's weights travel through another's rank."""
        from megatron.core import parallel_state as ps

        return self.tp_rank == 0 and ps.get_context_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0

    def sync_tensors(self):
        """This stage's (HF name, tensor) in the HF dtype, gathered over TP / EP one tensor at a time."""
        from glm_rl.trainer.backends.megatron.bridge import export_stage_weights

        return ((n, t.to(self.hf_dtypes[n])) for n, t in export_stage_weights(self.model, self.spec))

    def flatten_weights(self):
        """Not supported: the colocated `tensor` sync shares the torch backend's HF weights as one buffer (the
        config refuses --update-weight-transfer-mode tensor with --backend megatron)."""
        raise NotImplementedError("--update-weight-transfer-mode tensor needs --backend torch")

    def save(self, path: Path) -> None:
        from glm_rl.checkpoint import make_dirs, save_torch

        make_dirs(path)
        save_torch({"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}, path / "trainer.pt")

    def load(self, path: Path) -> None:
        from glm_rl.checkpoint import load_torch

        state = load_torch(path / "trainer.pt", self.device)  # weights_only: loading runs no code
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
