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

Two choices here change gradients, not just numbers, so each is named (and a flag):
- MIS normalisation (`MIS_NORMALIZATIONS`, --mis-normalization): divide by the mean weight over the *kept*
  tokens (kept weights then average 1; our default), by the mean of min(rho, truncate) over *all* masked tokens,
  rejected and vetoed ones included (miles / slime's `tis_batch_normalize`), or not at all.
- How GSPO applies per-token weights (`GSPO_TOKEN_WEIGHTS`, --gspo-token-weights; see `gspo_token_weights`).

All weights and masks returned here are detached: they rescale the gradient, they are not differentiated.
Entries where loss_mask is 0 are ignored (padding may hold any value).
"""

from __future__ import annotations

import torch

from glm_rl.algo.masking import check_same_shape, masked_mean, zero_masked

MIS_NORMALIZATIONS = ("kept-tokens", "all-tokens", "none")
GSPO_TOKEN_WEIGHTS = ("per-token", "sequence-mean")


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


def _validate_mis(
    truncate: float, mask_low: float, mask_high: float, veto_threshold: float, normalization: str
) -> None:
    if not truncate > 0.0:
        raise ValueError(f"truncate must be > 0, got truncate={truncate}")
    if not 0.0 <= mask_low < mask_high:
        raise ValueError(f"need 0 <= mask_low < mask_high, got mask_low={mask_low}, mask_high={mask_high}")
    if not veto_threshold >= 0.0:
        raise ValueError(f"veto_threshold must be >= 0, got veto_threshold={veto_threshold}")
    if normalization not in MIS_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {', '.join(MIS_NORMALIZATIONS)}, got {normalization!r}")


def mis_weights(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    truncate: float = 2.0,
    mask_low: float = 0.5,
    mask_high: float = 2.0,
    veto_threshold: float = 1e-4,
    normalization: str = "kept-tokens",
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Masked IS: (weights (B, T), new_loss_mask (B, T), metrics), all detached.

    1. token rejection: tokens with rho outside [mask_low, mask_high] leave the loss mask;
    2. sequence veto: a sequence with any masked token of rho < veto_threshold loses its whole mask;
    3. weights = min(rho, truncate) on kept tokens, 0 elsewhere;
    4. normalization (over every token of this call; the trainer calls it once per rollout batch):
       "kept-tokens": divide by the mean weight over the kept tokens, which then average exactly 1;
       "all-tokens": divide by the mean of min(rho, truncate) over all masked tokens, rejected and vetoed ones
       included (miles / slime, which call it per micro-batch): kept weights average 1 only if none is removed;
       "none": leave them. Weights are left as they are when the divisor is 0 (nothing kept / masked).

    Metrics: correction/mis_masked_frac (fraction of originally masked tokens removed, vetoes included),
    correction/mis_veto_frac (fraction of the B sequences vetoed), correction/mis_weight_mean (masked mean
    of the kept weights before normalisation).
    """
    check_same_shape(old_logp=old_logp, rollout_logp=rollout_logp, loss_mask=loss_mask)
    _validate_mis(truncate, mask_low, mask_high, veto_threshold, normalization)
    mask = loss_mask.bool()  # (B, T)
    ratio = torch.exp(_log_ratio(old_logp, rollout_logp, mask))  # (B, T)

    in_band = (ratio >= mask_low) & (ratio <= mask_high)  # (B, T)
    vetoed = ((ratio < veto_threshold) & mask).any(dim=1)  # (B,)
    keep = mask & in_band & ~vetoed[:, None]  # (B, T)

    truncated = ratio.clamp(max=truncate)  # (B, T)
    weights = torch.where(keep, truncated, torch.zeros_like(ratio))  # (B, T)
    weight_mean = masked_mean(weights, keep)  # ()
    match normalization:
        case "kept-tokens":
            divisor = weight_mean
        case "all-tokens":
            divisor = masked_mean(truncated, mask)
        case _:  # "none" (validated above)
            divisor = torch.ones_like(weight_mean)
    if divisor.item() > 0.0:
        weights = weights / divisor

    removed = (mask & ~keep).to(torch.float32)  # (B, T)
    metrics = {
        "correction/mis_masked_frac": masked_mean(removed, mask).item(),
        "correction/mis_veto_frac": vetoed.to(torch.float32).mean().item() if vetoed.numel() else 0.0,
        "correction/mis_weight_mean": weight_mean.item(),
    }
    return weights, keep.to(loss_mask.dtype), metrics


def gspo_token_weights(weights: torch.Tensor, loss_mask: torch.Tensor, form: str = "per-token") -> torch.Tensor:
    """Per-token weights (B, T) as the GSPO loss should apply them, detached (the loss ignores unmasked entries).

    GSPO's ratio s_i is one number per sequence, so a weight w_t can act two ways, with equal loss values but
    different gradients once w varies within a sequence (trainer and engine drift apart):
    - "per-token" (GSPO-token form, our default): w_t scales its own token's term, d loss / d logp_t ∝ s_i w_t,
      so the weights come back unchanged;
    - "sequence-mean" (slime / miles differentiate w_t * s_i through s_i = exp(mean_t log-ratio)): every token
      gets d loss / d logp_t ∝ s_i * mean_t(w_t), so this returns each sequence's masked mean weight on its
      tokens. Exact for one advantage per sequence (all of glm_rl's estimators), where a sequence's tokens also
      share their clip decision.
    """
    check_same_shape(weights=weights, loss_mask=loss_mask)
    mask = loss_mask.bool()  # (B, T)
    match form:
        case "per-token":
            return weights.detach()
        case "sequence-mean":
            seq_mean = masked_mean(weights.detach(), mask, dim=1)  # (B,)
            return zero_masked(seq_mean[:, None].expand_as(weights), mask)
        case _:
            raise ValueError(f"form must be one of {', '.join(GSPO_TOKEN_WEIGHTS)}, got form={form!r}")
