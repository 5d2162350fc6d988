"""Routing replay for MoE routers: record the trainer's expert choice, or force a given one.

- R2 (`--use-routing-replay`): record in the old-logprob pass, replay in the training pass, so the policy
  ratio compares the same experts.
- R3 (`--use-rollout-routing-replay`): replay the experts the rollout engine chose.

Replay forces only the *choice*: the gate weights are the router's own sigmoid scores gathered at the forced
experts (normalised and scaled as GLM-4.5 does), so gradients still reach the router. The state lives in this
object, installed on one model; nothing global.
"""

from __future__ import annotations

import types
from typing import Literal

import torch

Mode = Literal["off", "record", "replay"]


class RoutingReplay:
    def __init__(self, model) -> None:
        cfg = model.config
        self.routers = [layer.mlp.gate for i, layer in enumerate(model.model.layers) if i >= cfg.first_k_dense_replace]
        self.top_k = cfg.num_experts_per_tok
        self.mode: Mode = "off"
        self._forced: torch.Tensor | None = None  # (B, T, n_moe, k)
        self._valid: torch.Tensor | None = None  # (B, T) bool
        self._recorded: list[torch.Tensor | None] = [None] * len(self.routers)
        self.agree = 0
        self.total = 0
        for j, router in enumerate(self.routers):
            original = router.forward
            router.forward = types.MethodType(self._make_forward(j, original), router)

    @property
    def num_moe_layers(self) -> int:
        return len(self.routers)

    def record(self, valid: torch.Tensor) -> None:
        self.mode, self._valid, self._forced = "record", valid, None
        self._recorded = [None] * len(self.routers)

    def replay(self, forced: torch.Tensor, valid: torch.Tensor) -> None:
        if forced.shape[2:] != (len(self.routers), self.top_k):
            raise ValueError(
                f"routing to replay has shape {tuple(forced.shape)}, expected (B, T, {len(self.routers)}, {self.top_k})"
            )
        self.mode, self._forced, self._valid = "replay", forced, valid

    def off(self) -> None:
        self.mode, self._forced, self._valid = "off", None, None

    def recorded(self) -> torch.Tensor:
        """(B, T, n_moe, k) expert ids chosen in the last recorded forward."""
        B, T = self._valid.shape
        return torch.stack([r.view(B, T, self.top_k) for r in self._recorded], dim=2)

    def take_agreement(self) -> tuple[int, int]:
        """(agreeing, total) token-layer choices since the last call: natural top-k set == replayed set."""
        out = (self.agree, self.total)
        self.agree = self.total = 0
        return out

    def _make_forward(self, j: int, original):
        replay = self

        def forward(router, hidden_states):
            logits, weights, idx = original(hidden_states)  # natural choice: (N, E), (N, k), (N, k)
            if replay.mode == "record":
                replay._recorded[j] = idx.detach().clone()
            if replay.mode != "replay":
                return logits, weights, idx
            forced = replay._forced[:, :, j, :].reshape(-1, replay.top_k).to(idx.device)
            valid = replay._valid.reshape(-1).to(idx.device)
            same = (idx.sort(-1).values == forced.sort(-1).values).all(-1) & valid
            replay.agree += int(same.sum())
            replay.total += int(valid.sum())
            scores = logits.sigmoid()
            w = scores.gather(1, forced)
            if router.norm_topk_prob:
                w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
            return logits, (w * router.routed_scaling_factor).to(weights.dtype), forced

        return forward
