"""Importance-weight corrections for the training-inference mismatch.

Rollouts are sampled by the inference engine, whose numerics (kernels, precision, MoE routing) differ from
the trainer's, so the engine's sampling distribution mu is not exactly the trainer's behaviour policy
pi_old. Per token we have old_logp = log pi_old(y_t) (recomputed by the trainer) and rollout_logp =
log mu(y_t) (reported by the engine), and the correcting ratio is rho_t = pi_old(y_t) / mu(y_t) =
exp(old_logp - rollout_logp).

- TIS, truncated importance sampling (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
  Off-Policy RL Training"): multiply the per-token policy-gradient loss by clamp(rho, clip_low, clip).
- MIS, masked importance sampling (Liu et al. 2025, "When Speed Kills Stability: Demystifying RL Collapse
  from the Training-Inference Mismatch"): rather than only truncating, *reject* tokens whose rho lies
  outside a trust band (they leave the loss mask, hence the loss denominator), and veto whole sequences that
  contain a token the trainer finds nearly impossible (rho < veto_threshold), a sign of a broken rollout.

All weights and masks returned here are detached: they rescale the gradient, they are not differentiated.
Entries where loss_mask is 0 are ignored (padding may hold any value).
"""

from __future__ import annotations

import torch

from glm_rl.algo.masking import check_same_shape, masked_mean


def _log_ratio(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """old_logp - rollout_logp on masked tokens, 0 elsewhere; detached, float32. (B, T)"""
    diff = (old_logp.detach() - rollout_logp.detach()).to(torch.float32)  # (B, T)
    return torch.where(mask, diff, torch.zeros_like(diff))


def tis_weights(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    clip: float = 2.0,
    clip_low: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated IS weights w = clamp(exp(old_logp - rollout_logp), clip_low, clip), (B, T), and metrics.

    Metrics: correction/tis_weight_mean (masked mean of w), correction/tis_clipfrac (masked fraction of
    tokens whose raw ratio lay outside [clip_low, clip]).
    """
    check_same_shape(old_logp=old_logp, rollout_logp=rollout_logp, loss_mask=loss_mask)
    if not 0.0 <= clip_low < clip:
        raise ValueError(f"need 0 <= clip_low < clip, got clip_low={clip_low}, clip={clip}")
    mask = loss_mask.bool()  # (B, T)
    ratio = torch.exp(_log_ratio(old_logp, rollout_logp, mask))  # (B, T)
    weights = ratio.clamp(min=clip_low, max=clip)  # (B, T)
    clipped = ((ratio < clip_low) | (ratio > clip)).to(torch.float32)  # (B, T)
    metrics = {
        "correction/tis_weight_mean": masked_mean(weights, mask).item(),
        "correction/tis_clipfrac": masked_mean(clipped, mask).item(),
    }
    return weights, metrics


def _validate_mis(truncate: float, mask_low: float, mask_high: float, veto_threshold: float) -> None:
    if not truncate > 0.0:
        raise ValueError(f"truncate must be > 0, got truncate={truncate}")
    if not 0.0 <= mask_low < mask_high:
        raise ValueError(f"need 0 <= mask_low < mask_high, got mask_low={mask_low}, mask_high={mask_high}")
    if not veto_threshold >= 0.0:
        raise ValueError(f"veto_threshold must be >= 0, got veto_threshold={veto_threshold}")


def mis_weights(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    truncate: float = 2.0,
    mask_low: float = 0.5,
    mask_high: float = 2.0,
    veto_threshold: float = 1e-4,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Masked IS: (weights (B, T), new_loss_mask (B, T), metrics), all detached.

    1. token rejection: tokens with rho outside [mask_low, mask_high] leave the loss mask;
    2. sequence veto: a sequence with any masked token of rho < veto_threshold loses its whole mask;
    3. weights = min(rho, truncate) on kept tokens, 0 elsewhere;
    4. if normalize, weights are divided by their masked mean over the kept tokens of the whole batch, so
       that mean becomes 1 (left as is when no token is kept).

    Metrics: correction/mis_masked_frac (fraction of originally masked tokens removed, vetoes included),
    correction/mis_veto_frac (fraction of the B sequences vetoed), correction/mis_weight_mean (masked mean
    of the kept weights before normalisation).
    """
    check_same_shape(old_logp=old_logp, rollout_logp=rollout_logp, loss_mask=loss_mask)
    _validate_mis(truncate, mask_low, mask_high, veto_threshold)
    mask = loss_mask.bool()  # (B, T)
    ratio = torch.exp(_log_ratio(old_logp, rollout_logp, mask))  # (B, T)

    in_band = (ratio >= mask_low) & (ratio <= mask_high)  # (B, T)
    vetoed = ((ratio < veto_threshold) & mask).any(dim=1)  # (B,)
    keep = mask & in_band & ~vetoed[:, None]  # (B, T)

    weights = torch.where(keep, ratio.clamp(max=truncate), torch.zeros_like(ratio))  # (B, T)
    weight_mean = masked_mean(weights, keep)  # ()
    if normalize and bool(keep.any()) and weight_mean.item() > 0.0:
        weights = weights / weight_mean

    removed = (mask & ~keep).to(torch.float32)  # (B, T)
    metrics = {
        "correction/mis_masked_frac": masked_mean(removed, mask).item(),
        "correction/mis_veto_frac": vetoed.to(torch.float32).mean().item() if vetoed.numel() else 0.0,
        "correction/mis_weight_mean": weight_mean.item(),
    }
    return weights, keep.to(loss_mask.dtype), metrics
