"""R2 / R3 routing replay on megatron-core's own `RouterReplay` (transformer/moe/router_replay.py).

With `moe_enable_routing_replay=True` every MoE router owns a `RouterReplay`; its action decides the top-k:
RECORD keeps the router's choice, REPLAY_FORWARD uses the indices we set (the gate weights are still the
router's own scores gathered at those experts, so gradients reach the router). This class drives the routers
of ONE pipeline stage of ONE model (it collects them from the module tree, not from megatron's class-level
list, so a reference model built without replay is never touched) and adds what the RL loop needs on top:
- which slice of the routing is this rank's: the stage's MoE layers (`offset` = MoE layers on earlier stages)
  and its tokens — the CP rank's load-balanced chunks (cp_attention.split_for_cp), then, with sequence
  parallelism, this TP rank's contiguous part of them; the router sees them flattened sequence-major,
  `(S_local, B) → N`;
- recompute: megatron's full / MoE recompute re-runs the router in the backward pass. Each `replay` call also
  queues its indices (megatron's `replay_backward_list`) and `forward_done` switches the routers to
  REPLAY_BACKWARD, which pops that queue in order — backward passes run in forward order under PP's 1F1B
  too, so a recomputed layer routes a micro-batch as its forward did, not as the latest forward did;
- R2's record, gathered back over TP, CP and the pipeline stages into `(B, T, n_moe, k)`;
- `routing/replay_agreement`: in replay (forward only, never in a recompute), the router's natural top-k set
  is also computed and compared with the replayed one on real (non-pad) tokens, as
  `trainer/routing_replay.py` does for the torch backend. Counts are this rank's share; the backend sums them.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist

from glm_rl.trainer.backends.megatron.cp_attention import gather_from_cp, split_for_cp


class MegatronRoutingReplay:
    def __init__(
        self,
        model: torch.nn.Module,
        top_k: int,
        *,
        tp_rank: int = 0,
        tp_size: int = 1,
        tp_group=None,
        sequence_parallel: bool = False,
        cp_group=None,
        pp_group=None,
        device: str = "cpu",
    ) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        self.layers = [
            m.router_replay for m in model.modules() if isinstance(m, TopKRouter) and m.router_replay is not None
        ]
        self.top_k, self.device = top_k, device
        self.split = tp_size if sequence_parallel else 1  # ranks the sequence is cut over inside the MoE layer
        self.rank, self.group = (tp_rank, tp_group) if sequence_parallel else (0, None)
        self.cp_group = cp_group if cp_group is not None and cp_group.size() > 1 else None
        self.cp, self.cp_rank = (self.cp_group.size(), self.cp_group.rank()) if self.cp_group else (1, 0)
        self.pp_group = pp_group if pp_group is not None and pp_group.size() > 1 else None
        counts = [len(self.layers)]
        if self.pp_group:  # MoE layers per stage, in stage order
            counts = [None] * self.pp_group.size()
            dist.all_gather_object(counts, len(self.layers), group=self.pp_group)
        self.offset = sum(counts[: self.pp_group.rank()]) if self.pp_group else 0
        self.num_moe_layers = sum(counts)  # the whole model's
        self.mode = "off"
        self._valid: torch.Tensor | None = None  # (N_local,) bool, this rank's tokens in router order
        self._shape: tuple[int, int] | None = None  # (B, T) of the current micro-batch
        self.agree = self.total = 0
        for replay in self.layers:
            replay.get_replay_topk = types.MethodType(self._counting(replay.get_replay_topk), replay)

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) → this rank's router rows (S_local·B, ...), sequence-major."""
        x = split_for_cp(x, self.cp_rank, self.cp, dim=1)
        B, T = x.shape[:2]
        chunk = T // self.split
        x = x[:, self.rank * chunk : (self.rank + 1) * chunk].transpose(0, 1)  # (S_local, B, ...)
        return x.reshape(chunk * B, *x.shape[2:])

    def record(self, valid: torch.Tensor) -> None:
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        self.off()
        self.mode, self._shape, self._valid = "record", tuple(valid.shape), self._local(valid)
        for r in self.layers:
            r.set_router_replay_action(RouterReplayAction.RECORD)

    def replay(self, forced: torch.Tensor, valid: torch.Tensor) -> None:
        """forced: (B, T, n_moe, k) expert ids per position for the whole model's MoE layers (pad rows: any
        distinct ids); valid: (B, T). Queues this stage's slice for a recompute in the backward pass."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        if tuple(forced.shape[2:]) != (self.num_moe_layers, self.top_k):
            raise ValueError(
                f"routing to replay has shape {tuple(forced.shape)}, expected "
                f"(B, T, {self.num_moe_layers}, {self.top_k})"
            )
        self.mode, self._shape, self._valid = "replay", tuple(valid.shape), self._local(valid)
        local = self._local(forced[:, :, self.offset : self.offset + len(self.layers)])  # (N_local, n_stage, k)
        for j, r in enumerate(self.layers):
            r.set_target_indices(local[:, j].contiguous())
            r.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)

    def forward_done(self) -> None:
        """The micro-batch's forward is over: a recompute in its backward pops the queued indices."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        if self.mode == "replay":
            for r in self.layers:
                r.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)

    def off(self) -> None:
        for r in self.layers:
            r.clear_router_replay_action()
            r.clear_indices()
        self.mode, self._valid = "off", None

    def recorded_local(self) -> tuple[torch.Tensor, tuple[int, int]]:
        """(this rank's recorded ids (S_local, B, n_stage, k), the micro-batch's (B, T)); `gather` assembles."""
        B, T = self._shape
        rows = T // self.cp // self.split
        if not self.layers:
            return torch.zeros((rows, B, 0, self.top_k), dtype=torch.long, device=self.device), self._shape
        return torch.stack([r.get_recorded_indices().view(rows, B, self.top_k) for r in self.layers], 2), self._shape

    def gather(self, recorded: tuple[torch.Tensor, tuple[int, int]]) -> torch.Tensor:
        """(B, T, n_moe, k): a `recorded_local` result gathered over the SP split, CP and the pipeline stages.
        Collective over those groups."""
        local = recorded[0]
        if self.split > 1:
            parts = [torch.empty_like(local) for _ in range(self.split)]
            dist.all_gather(parts, local.contiguous(), group=self.group)
            local = torch.cat(parts, dim=0)
        local = gather_from_cp(local.transpose(0, 1), self.cp_group)  # (B, T, n_stage, k)
        if self.pp_group:  # stages hold different numbers of MoE layers: gather as objects, concat in order
            stages = [None] * self.pp_group.size()
            dist.all_gather_object(stages, local.cpu(), group=self.pp_group)
            local = torch.cat(stages, dim=2)
        return local

    def recorded(self) -> torch.Tensor:
        """(B, T, n_moe, k) expert ids chosen in the last recorded forward (collective, see `gather`)."""
        return self.gather(self.recorded_local())

    def take_agreement(self) -> tuple[int, int]:
        """(agreeing, total) token-layer choices on this rank since the last call (its tokens and layers)."""
        out = (self.agree, self.total)
        self.agree = self.total = 0
        return out

    def _counting(self, original):
        tracker = self

        def get_replay_topk(replay, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
            from megatron.core.transformer.moe.router_replay import RouterReplayAction

            if replay.router_replay_action == RouterReplayAction.REPLAY_FORWARD and tracker._valid is not None:
                with torch.no_grad():
                    _, natural = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
                    forced = replay.target_topk_idx.to(natural.device)
                    valid = tracker._valid.to(natural.device)
                    same = (natural.sort(-1).values == forced.sort(-1).values).all(-1) & valid
                    tracker.agree += int(same.sum())
                    tracker.total += int(valid.sum())
            return original(scores, topk, num_groups, group_topk, default_compute_topk)

        return get_replay_topk
