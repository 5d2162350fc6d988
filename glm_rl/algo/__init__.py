"""RL algorithm math as pure torch functions: advantages, KL, policy losses, mismatch corrections.

Per-token tensors are (B, T) with a 0/1 `loss_mask` (B, T); sequence-level tensors are (B,). Nothing here
holds state or reads global configuration; every knob is a keyword argument (or `PolicyLossConfig`).
"""

from glm_rl.algo.advantages import (
    ESTIMATORS,
    broadcast_to_tokens,
    compute_advantages,
    dr_grpo_advantages,
    grpo_advantages,
    gspo_advantages,
)
from glm_rl.algo.corrections import GSPO_TOKEN_WEIGHTS, MIS_NORMALIZATIONS, gspo_token_weights, mis_weights, tis_weights
from glm_rl.algo.kl import KL_KINDS, entropy_from_logits, kl_estimate
from glm_rl.algo.losses import LEVELS, PolicyLoss, PolicyLossConfig, policy_loss
from glm_rl.algo.masking import masked_mean, masked_sum
from glm_rl.algo.mismatch import mismatch_metrics

__all__ = [
    "ESTIMATORS",
    "GSPO_TOKEN_WEIGHTS",
    "KL_KINDS",
    "LEVELS",
    "MIS_NORMALIZATIONS",
    "PolicyLoss",
    "PolicyLossConfig",
    "broadcast_to_tokens",
    "compute_advantages",
    "dr_grpo_advantages",
    "entropy_from_logits",
    "grpo_advantages",
    "gspo_advantages",
    "gspo_token_weights",
    "kl_estimate",
    "masked_mean",
    "masked_sum",
    "mis_weights",
    "mismatch_metrics",
    "policy_loss",
    "tis_weights",
]
