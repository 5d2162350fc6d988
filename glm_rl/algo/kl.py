"""Per-token KL estimators and the entropy of a categorical policy.

With log_ratio = logp - ref_logp evaluated on tokens sampled from the policy pi, Schulman's estimators of
KL(pi || ref) ("Approximating KL Divergence", J. Schulman, 2020) are, with r = ref / pi = exp(-log_ratio):

- k1 = -log r = log_ratio                        unbiased, high variance, can be negative
- k2 = 0.5 * (log r)^2 = 0.5 * log_ratio^2       biased, low variance, >= 0
- k3 = (r - 1) - log r = exp(-log_ratio) - 1 + log_ratio   unbiased, low variance, >= 0
- "low_var_kl" = k3 clamped to [-10, 10] (the name and clamp used by verl / slime), which bounds the
  loss when a token's probability under pi and ref drifts far apart.
"""

from __future__ import annotations

import torch

KL_KINDS = ("k1", "k2", "k3", "low_var_kl")
LOW_VAR_KL_CLAMP = 10.0


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate (B, T) of KL(pi || ref) from logp (B, T) and ref_logp (B, T); `kind` in KL_KINDS."""
    if logp.shape != ref_logp.shape:
        raise ValueError(f"shape mismatch: logp={tuple(logp.shape)}, ref_logp={tuple(ref_logp.shape)}")
    log_ratio = logp - ref_logp  # (B, T)
    match kind:
        case "k1":
            return log_ratio
        case "k2":
            return 0.5 * log_ratio.square()
        case "k3":
            return torch.expm1(-log_ratio) + log_ratio
        case "low_var_kl":
            k3 = torch.expm1(-log_ratio) + log_ratio
            return k3.clamp(min=-LOW_VAR_KL_CLAMP, max=LOW_VAR_KL_CLAMP)
        case _:
            raise ValueError(f"unknown KL kind {kind!r}; valid kinds: {', '.join(KL_KINDS)}")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (B, T) of softmax(logits) over the last axis, logits (B, T, V); computed in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    plogp = logp.exp() * logp  # (B, T, V); 0 * -inf = NaN for vocab entries masked to -inf logits
    plogp = torch.where(torch.isneginf(logp), torch.zeros_like(plogp), plogp)
    return -plogp.sum(dim=-1)  # (B, T)
