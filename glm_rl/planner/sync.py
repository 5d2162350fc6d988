"""Weight-sync prediction for `glm-rl plan`: how long one trainer -> engines weight update takes.

Kept apart from the memory estimate (`glm_rl/planner/estimate.py`) because it is a different model: the P2P
transfer plan (`glm_rl.weights.transfer_plan`) over the model's HF tensors, priced at one NIC per GPU. p2p: the
busiest NIC of the plan. broadcast: one source sends a full copy (a lower bound for gather then broadcast).
tensor (colocated CUDA IPC): the same cross-node bytes as p2p, then a device-memory copy of each engine rank's
share. floor: every delivered byte spread evenly over the smaller side's NICs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from glm_rl.parallel import ParallelLayout
    from glm_rl.planner.estimate import PlanInput

SYNC_CHUNK_BYTES = 256 << 20


def predict_sync(p: PlanInput, lo: ParallelLayout, trainer_gpus: int, engines: int) -> dict:
    """Predicted seconds per transport for one weight sync, and the physical floor."""
    from glm_rl.models.glm45.hf_names import hf_tensor_metas, split_dim
    from glm_rl.weights.transfer_plan import (
        EngineLayout,
        build_plan,
        floor_seconds,
        megatron_sources,
        predict_sync_seconds,
    )

    tensors = hf_tensor_metas(p.spec)
    per = p.rollout_num_gpus_per_engine
    sources = megatron_sources(
        tensors, world=trainer_gpus, tp=lo.tp, pp=lo.pp, ep=lo.ep, num_layers=p.spec.num_hidden_layers, split=split_dim
    )
    plan = build_plan(
        tensors, sources, [EngineLayout(e, per, split_dim) for e in range(engines)], chunk_bytes=SYNC_CHUNK_BYTES
    )
    nic = p.hardware.nic_bytes_s
    model_bytes = sum(t.itemsize * _numel(t.shape) for t in tensors)
    p2p = predict_sync_seconds(plan, nic)
    floor = floor_seconds(plan.total_bytes, min(trainer_gpus, engines * per), nic)
    local_copy = 2 * max(plan.bytes_per_destination().values()) / p.hardware.hbm_bytes_s
    return {
        "bytes_delivered": plan.total_bytes,
        "model_bytes": model_bytes,
        "max_source_bytes": max(plan.bytes_per_source().values()),
        "max_dest_bytes": max(plan.bytes_per_destination().values()),
        "seconds": {"p2p": p2p, "broadcast": model_bytes / nic, "tensor": p2p + local_copy if p.colocate else None},
        "floor_s": floor,
        "p2p_over_floor": p2p / floor if floor else None,
        "chosen": p.update_weight_transfer_mode,
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
