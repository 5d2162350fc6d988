"""R2 / R3 routing replay on megatron-core's own `RouterReplay` (transformer/moe/router_replay.py).

With `moe_enable_routing_replay=True` every MoE router owns a `RouterReplay`; its action decides the top-k:
RECORD keeps the router's choice, REPLAY_FORWARD uses the indices we set (the gate weights are still the
router's own scores gathered at those experts, so gradients reach the router). This class drives the routers
of ONE model (it collects them from the module tree, not from megatron's class-level list, so a reference
model built without replay is never touched) and adds what the RL loop needs on top:
- the token order: the router sees its layer's input flattened sequence-major, `(S_local, B) → N`; with
  sequence parallelism S_local is this TP rank's contiguous chunk of the (padded) sequence;
- R2's record, gathered back over TP into `(B, T, n_moe, k)`;
- `routing/replay_agreement`: in replay, the router's natural top-k set is also computed and compared with the
  replayed one on real (non-pad) tokens, as `trainer/routing_replay.py` does for the torch backend.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist


class MegatronRoutingReplay:
    def __init__(self, model: torch.nn.Module, top_k: int, *, tp_rank: int = 0, tp_size: int = 1, tp_group=None,
                 sequence_parallel: bool = False) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        self.layers = [m.router_replay for m in model.modules()
                       if isinstance(m, TopKRouter) and m.router_replay is not None]
        self.top_k = top_k
        self.split = tp_size if sequence_parallel else 1  # ranks the sequence is cut over inside the MoE layer
        self.rank, self.group = (tp_rank, tp_group) if sequence_parallel else (0, None)
        self.mode = "off"
        self._valid: torch.Tensor | None = None  # (N_local,) bool, this rank's tokens in router order
        self._shape: tuple[int, int] | None = None  # (B, T) of the current micro-batch
        self.agree = self.total = 0
        for replay in self.layers:
            replay.get_replay_topk = types.MethodType(self._counting(replay.get_replay_topk), replay)

    @property
    def num_moe_layers(self) -> int:
        return len(self.layers)

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) → this rank's router rows (S_local·B, ...), sequence-major."""
        B, T = x.shape[:2]
        chunk = T // self.split
        x = x[:, self.rank * chunk:(self.rank + 1) * chunk].transpose(0, 1)  # (S_local, B, ...)
        return x.reshape(chunk * B, *x.shape[2:])

    def record(self, valid: torch.Tensor) -> None:
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        self.off()
        self.mode, self._shape, self._valid = "record", tuple(valid.shape), self._local(valid)
        for r in self.layers:
            r.set_router_replay_action(RouterReplayAction.RECORD)

    def replay(self, forced: torch.Tensor, valid: torch.Tensor) -> None:
        """forced: (B, T, n_moe, k) expert ids per position (pad rows: any distinct ids); valid: (B, T)."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        if tuple(forced.shape[2:]) != (len(self.layers), self.top_k):
            raise ValueError(f"routing to replay has shape {tuple(forced.shape)}, expected "
                             f"(B, T, {len(self.layers)}, {self.top_k})")
        self.off()
        self.mode, self._shape, self._valid = "replay", tuple(valid.shape), self._local(valid)
        local = self._local(forced)  # (N_local, n_moe, k)
        for j, r in enumerate(self.layers):
            r.set_target_indices(local[:, j].contiguous())
            r.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)

    def off(self) -> None:
        for r in self.layers:
            r.clear_router_replay_action()
            r.clear_indices()
        self.mode, self._valid = "off", None

    def recorded(self) -> torch.Tensor:
        """(B, T, n_moe, k) expert ids chosen in the last recorded forward, gathered over the sequence split."""
        B, T = self._shape
        chunk = T // self.split
        local = torch.stack([r.get_recorded_indices().view(chunk, B, self.top_k) for r in self.layers], dim=2)
        if self.split > 1:
            parts = [torch.empty_like(local) for _ in range(self.split)]
            dist.all_gather(parts, local.contiguous(), group=self.group)
            local = torch.cat(parts, dim=0)
        return local.transpose(0, 1)  # (B, T, n_moe, k)

    def take_agreement(self) -> tuple[int, int]:
        """(agreeing, total) token-layer choices on this rank since the last call (its share of the sequence)."""
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
