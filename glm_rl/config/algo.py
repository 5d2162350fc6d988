"""The `algo` section: advantages, the policy loss, corrections (TIS / MIS), and routing replay.

Routing replay is one decision, `RoutingReplay` (off, R2 or R3), derived from the two slime flags when the
section is built; everything downstream reads the enum: the trainer picks the routing it replays from it, and
`engines_return_routed_experts` says what the rollout engines must send back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

from glm_rl.config.fields import opt


class RoutingReplay(enum.StrEnum):
    """Which MoE routing the trainer's forward passes replay."""

    OFF = "off"  # every pass routes with its own weights
    R2 = "r2"  # --use-routing-replay: record the trainer's routing in the old-logprob pass, replay it in training
    R3 = "r3"  # --use-rollout-routing-replay: replay the experts the rollout engine chose, in every pass

    @classmethod
    def from_flags(cls, use_routing_replay: bool, use_rollout_routing_replay: bool) -> RoutingReplay:
        """R3 wins when both flags are on (the trainer always did); `RunConfig.validate` refuses that pair."""
        if use_rollout_routing_replay:
            return cls.R3
        return cls.R2 if use_routing_replay else cls.OFF


def engines_return_routed_experts(replay: RoutingReplay) -> bool:
    """What the rollout engines must return besides tokens and logprobs: the experts each token was routed to,
    exactly when the trainer replays them (R3). Every engine-side setting derives from this one answer (the SGLang
    server flag, the embedded engine's recording and default, the requests' `return_routed_experts`)."""
    return replay is RoutingReplay.R3


@dataclass(frozen=True)
class AlgoConfig:
    advantage_estimator: Literal["grpo", "gspo", "dr_grpo"] = opt("gspo", "advantage / ratio estimator")
    eps_clip: float = opt(0.2, "PPO clip range (low side)")
    eps_clip_high: float | None = opt(None, "PPO clip range, high side (default: --eps-clip)")
    eps_clip_c: float | None = opt(None, "dual-clip constant c > 1 (off by default)")
    kl_loss_coef: float = opt(0.0, "KL(policy || reference) loss coefficient")
    kl_loss_type: Literal["k1", "k2", "k3", "low_var_kl"] = opt("low_var_kl", "KL estimator")
    entropy_coef: float = opt(0.0, "entropy bonus coefficient")
    use_tis: bool = opt(True, "truncated importance sampling on the train/rollout mismatch")
    tis_clip: float = opt(2.0, "TIS upper clamp")
    tis_clip_low: float = opt(0.0, "TIS lower clamp")
    enable_mis: bool = opt(False, "masked importance sampling (token rejection + sequence veto)")
    mis_truncate: float = opt(2.0, "MIS weight truncation")
    mis_mask_low: float = opt(0.5, "MIS: tokens with ratio below this leave the loss")
    mis_mask_high: float = opt(2.0, "MIS: tokens with ratio above this leave the loss")
    mis_veto_threshold: float = opt(1e-4, "MIS: a sequence with any token ratio below this is dropped")
    mis_normalization: Literal["kept-tokens", "all-tokens", "none"] = opt(
        "kept-tokens",
        "MIS: divide the weights by their mean over the kept tokens (they then average 1), or by the mean of "
        "min(ratio, --mis-truncate) over all generated tokens, rejected and vetoed ones included (miles), or none",
    )
    gspo_token_weights: Literal["per-token", "sequence-mean"] = opt(
        "per-token",
        "GSPO with TIS/MIS: each token's weight scales its own gradient term (GSPO-token form), or every token "
        "gets its sequence's mean weight (slime/miles differentiate the sequence ratio); same loss value",
    )
    use_rollout_logprobs: bool = opt(False, "use the engine's logprobs as old logprobs (skips the recompute)")
    recompute_old_logprobs: bool = opt(
        False,
        "always run the separate old-logprob pass; by default, when a step is one optimizer step over the whole "
        "batch (and no MIS, KL reference or R2 needs the pass), the training forward's own logprobs, detached, "
        "are the old ones: the weights have not moved yet",
    )
    use_routing_replay: bool = opt(False, "R2: record the trainer's routing in the old-logprob pass, replay it")
    use_rollout_routing_replay: bool = opt(True, "R3: replay the experts the engine chose")
    normalize_advantage_std: bool = opt(True, "GRPO/GSPO: divide by the group std")
    # derived, not a flag: the two replay flags above as one decision
    routing_replay: RoutingReplay = field(
        init=False, metadata={"help": "off, r2 or r3 (from the replay flags)", "cli": False}
    )

    def __post_init__(self) -> None:
        if self.gspo_token_weights != "per-token" and self.advantage_estimator != "gspo":
            raise ValueError(
                f"invalid configuration:\n  --gspo-token-weights {self.gspo_token_weights} needs "
                f"--advantage-estimator gspo (got {self.advantage_estimator})"
            )
        replay = RoutingReplay.from_flags(self.use_routing_replay, self.use_rollout_routing_replay)
        object.__setattr__(self, "routing_replay", replay)
