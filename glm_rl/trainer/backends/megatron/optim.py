"""Gradient reduction, clipping and the optimizer for a megatron-core model without megatron's DDP wrapper.

Shared by the RL backend (backend.py) and the recipes' trainer (glm_rl/recipes/runner.py).

`reduce_grads_and_clip` does what megatron's `finalize_model_grads` + DDP would: sequence-parallel-tagged
replicated params (norms, router) are summed over TP first, then routed-expert params over the expert-data-
parallel group (which spans CP too) and everything else over DP × CP (CP ranks split the tokens of the same
weights; the loss is pre-scaled by 1 / global tokens, so these are sums). Pipeline stages hold disjoint
parameters, except the word-embedding copy the last stage keeps for MTP (`_sum_duplicated_embedding`).
The grad norm counts each shard once: dense params over TP (TP-replicated ones on TP rank 0 only), expert params
over ETP × EP; clipping then scales like `torch.nn.utils.clip_grad_norm_`.

`Optimizer` is plain torch AdamW, or AdamW over fp32 master copies (on the CPU with `cpu_offload`) whose result
is copied back into the model's weights — no distributed optimizer (fine for CPU and small runs).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def is_routed_expert(name: str) -> bool:
    return ".experts." in name and ".shared_experts." not in name


def _all_reduce_flat(grads: list[torch.Tensor], group) -> None:
    if not grads or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def _sum_duplicated_embedding(model: torch.nn.Module) -> None:
    """Under PP with MTP (or tied embeddings) the last stage holds a copy of the first stage's word embedding
    (megatron tags it `shared`): sum the two copies' gradients over megatron's embedding group so both take the
    same update, as megatron's finalize_model_grads does. The copy is left out of the grad norm."""
    from megatron.core import parallel_state as ps

    config = getattr(model, "config", None)
    if config is None or not (
        getattr(model, "share_embeddings_and_output_weights", False) or getattr(config, "mtp_num_layers", None)
    ):
        return
    group = ps.get_embedding_group(check_initialized=False)
    if group is None or dist.get_world_size(group) == 1 or dist.get_rank() not in dist.get_process_group_ranks(group):
        return
    weight = model.shared_embedding_or_output_weight()
    if weight is not None and weight.requires_grad:
        dist.all_reduce(weight.grad, group=group)


def reduce_grads_and_clip(model: torch.nn.Module, clip_grad: float, device: str = "cpu") -> float:
    """Sum gradients over the right groups of the current megatron parallel state, clip; returns the norm."""
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for _, p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    expert = {n for n, _ in params if is_routed_expert(n)}
    groups = {  # group → grads summed over it; one flat all-reduce each
        "tp": [p.grad for n, p in params if getattr(p, "sequence_parallel", False) and tp > 1],
        "dp": [p.grad for n, p in params if n not in expert],
        "edp": [p.grad for n, p in params if n in expert],
    }
    # CP ranks hold the same weights and split the tokens: their dense grads are summed with DP's
    pg = {
        "tp": ps.get_tensor_model_parallel_group(),
        "dp": ps.get_data_parallel_group(with_context_parallel=True),
        "edp": ps.get_expert_data_parallel_group(),
    }
    for key in ("tp", "dp", "edp"):  # SP's TP sum first: the DP sum then adds whole TP-summed grads
        _all_reduce_flat(groups[key], pg[key])
    _sum_duplicated_embedding(model)
    dense_sq = sum(
        (p.grad.float() ** 2).sum()
        for n, p in params
        if n not in expert
        and not getattr(p, "shared", False)  # the last stage's embedding copy
        and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0)
    )
    expert_sq = sum(
        (p.grad.float() ** 2).sum()
        for n, p in params
        if n in expert and (getattr(p, "tensor_model_parallel", False) or ps.get_expert_tensor_parallel_rank() == 0)
    )
    sq = torch.stack([torch.as_tensor(x, dtype=torch.float32, device=device) for x in (dense_sq, expert_sq)])
    if dist.is_initialized():
        dist.all_reduce(sq[:1], group=ps.get_model_parallel_group())
        dist.all_reduce(sq[1:], group=ps.get_expert_tensor_model_pipeline_parallel_group())
    norm = float(sq.sum().sqrt())
    coef = clip_grad / (norm + 1e-6)
    if coef < 1:  # as torch.nn.utils.clip_grad_norm_
        for _, p in params:
            p.grad.mul_(coef)
    return norm


class Optimizer:
    """torch AdamW on the model's trainable parameters, or on fp32 master copies (`fp32_master`, on the CPU with
    `cpu_offload`) whose result is copied back after each step."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        cpu_offload: bool = False,
        fp32_master: bool = False,
    ) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = None
        if cpu_offload or fp32_master:
            self.master = [
                p.detach().to(device="cpu" if cpu_offload else p.device, dtype=torch.float32, copy=True)
                for p in self.params
            ]
        self.opt = torch.optim.AdamW(self.master or self.params, lr=lr, weight_decay=weight_decay, betas=betas)

    def step(self) -> None:
        if self.master is None:
            self.opt.step()
            return
        for m, p in zip(self.master, self.params):
            m.grad = p.grad.to(device=m.device, dtype=torch.float32)
        self.opt.step()
        with torch.no_grad():
            for m, p in zip(self.master, self.params):
                p.copy_(m)

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "master": self.master}

    def load_state_dict(self, state: dict) -> None:
        if self.master is not None and state["master"] is not None:
            for m, saved in zip(self.master, state["master"]):
                m.data.copy_(saved)
        self.opt.load_state_dict(state["opt"])
