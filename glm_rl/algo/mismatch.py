"""Diagnostics of the training-inference mismatch: how far the engine's token logprobs are from the trainer's.

Tokens are sampled by the rollout engine (mu), so with log r = trainer_logp - rollout_logp (r = pi / mu),
the k3 estimator (Schulman 2020) r - 1 - log r = exp(log r) - 1 - log r is an unbiased, non-negative
estimate of KL(mu || pi) = KL(rollout || trainer) under those samples. It equals
`kl_estimate(rollout_logp, trainer_logp, "k3")`. (The reverse direction would need samples from pi.)
"""

from __future__ import annotations

import torch

from glm_rl.algo.kl import kl_estimate
from glm_rl.algo.masking import check_same_shape, masked_max, masked_mean


def mismatch_metrics(
    trainer_logp: torch.Tensor, rollout_logp: torch.Tensor, loss_mask: torch.Tensor
) -> dict[str, float]:
    """Mismatch metrics over masked tokens of (B, T) inputs, as python floats.

    mismatch/logprob_abs_diff_mean, mismatch/logprob_abs_diff_max: |trainer_logp - rollout_logp|;
    mismatch/k3_kl: masked mean of k3 with log r = trainer_logp - rollout_logp, estimating
    KL(rollout || trainer). All are 0 when no token is masked in.
    """
    check_same_shape(trainer_logp=trainer_logp, rollout_logp=rollout_logp, loss_mask=loss_mask)
    mask = loss_mask.bool()  # (B, T)
    trainer = trainer_logp.detach().to(torch.float32)  # (B, T)
    rollout = rollout_logp.detach().to(torch.float32)  # (B, T)
    zero = torch.zeros_like(trainer)
    trainer, rollout = torch.where(mask, trainer, zero), torch.where(mask, rollout, zero)
    abs_diff = (trainer - rollout).abs()  # (B, T)
    k3 = kl_estimate(rollout, trainer, "k3")  # (B, T)
    return {
        "mismatch/logprob_abs_diff_mean": masked_mean(abs_diff, mask).item(),
        "mismatch/logprob_abs_diff_max": masked_max(abs_diff, mask).item(),
        "mismatch/k3_kl": masked_mean(k3, mask).item(),
    }
