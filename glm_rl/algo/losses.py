"""Clipped policy-gradient loss for GRPO / Dr.GRPO (token ratio) and GSPO (sequence ratio).

PPO clipped surrogate (Schulman et al. 2017, eq. 7), per token t of response i, written as a loss:

    pg = max(-A * rho, -A * clamp(rho, 1 - eps_clip, 1 + eps_clip_high))

with the asymmetric upper bound of DAPO's "clip-higher" (Yu et al. 2025) and, optionally, dual clip
(Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL"): for A < 0, pg = min(pg, -A * c),
c > 1, which bounds the loss when rho is huge on a negative-advantage token.

Ratio level:
- "token" (PPO / GRPO): rho_t = exp(logp_t - old_logp_t).
- "sequence" (GSPO, Zheng et al. 2025): the ratio is the length-normalised sequence ratio
  s_i = exp(mean_t (logp_t - old_logp_t)). We use the paper's GSPO-token form
  rho_t = exp(sg[log s_i] + logp_t - sg[logp_t]): its value is s_i on every token, and its gradient is
  s_i * grad logp_t, so the mean over the |y_i| tokens of a response gives (1/|y_i|) sum_t s_i grad logp_t,
  GSPO's sequence gradient. Clipping then acts on s_i, i.e. on whole responses.
  Without token_weights and with one advantage per response this is the gradient of differentiating s_i
  itself (slime / miles). With TIS / MIS token_weights w_t it is not: the loss values agree, but here token t's
  gradient is scaled by w_t, there by its response's mean weight. `corrections.gspo_token_weights` turns the
  weights into either form (--gspo-token-weights); this loss always applies w_t to token t.

Aggregation: every term is a masked mean over ALL response tokens in the batch (sum / total mask count), so
a batch's loss is the token-count-weighted mean of its micro-batches' losses. For GSPO with responses of
unequal length this weights response i by |y_i| / sum_j |y_j| rather than the paper's 1/G.

Total loss = pg + kl_coef * KL(pi || ref) - entropy_coef * entropy (each a masked mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from glm_rl.algo.kl import KL_KINDS, kl_estimate
from glm_rl.algo.masking import check_same_shape, masked_mean, zero_masked

LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class PolicyLossConfig:
    """Hyper-parameters of `policy_loss`; validated on construction."""

    eps_clip: float = 0.2
    eps_clip_high: float | None = None  # None -> eps_clip (symmetric clip)
    eps_clip_c: float | None = None  # dual-clip constant c > 1; None = off
    level: str = "token"  # "token" (PPO/GRPO) or "sequence" (GSPO)
    kl_coef: float = 0.0
    kl_type: str = "low_var_kl"
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.eps_clip < 1.0:
            raise ValueError(f"eps_clip must be in (0, 1), got eps_clip={self.eps_clip}")
        if self.eps_clip_high is not None and not self.eps_clip_high > 0.0:
            raise ValueError(f"eps_clip_high must be > 0 or None, got eps_clip_high={self.eps_clip_high}")
        if self.eps_clip_c is not None and not self.eps_clip_c > 1.0:
            raise ValueError(f"eps_clip_c must be > 1.0 or None, got eps_clip_c={self.eps_clip_c}")
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVELS)}, got level={self.level!r}")
        if not self.kl_coef >= 0.0:
            raise ValueError(f"kl_coef must be >= 0, got kl_coef={self.kl_coef}")
        if self.kl_type not in KL_KINDS:
            raise ValueError(f"kl_type must be one of {', '.join(KL_KINDS)}, got kl_type={self.kl_type!r}")
        if not self.entropy_coef >= 0.0:
            raise ValueError(f"entropy_coef must be >= 0, got entropy_coef={self.entropy_coef}")

    @property
    def clip_high(self) -> float:
        """The effective upper clip epsilon."""
        return self.eps_clip if self.eps_clip_high is None else self.eps_clip_high


class PolicyLoss(Protocol):
    """Contract of a policy loss.

    Inputs are per-token (B, T) tensors: logp (differentiable, current policy), old_logp (behaviour policy,
    no grad), loss_mask (0/1); advantages are (B, T) or per-sequence (B,). Optional ref_logp (B, T) for the
    KL penalty, token_weights (B, T) for TIS/MIS corrections, entropy (B, T). Returns a scalar loss to
    minimise (a masked mean over all tokens in the batch) and a dict of python-float metrics.
    """

    def __call__(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor,
        advantages: torch.Tensor,
        loss_mask: torch.Tensor,
        cfg: PolicyLossConfig,
        *,
        ref_logp: torch.Tensor | None = None,
        token_weights: torch.Tensor | None = None,
        entropy: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


def _log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """Log importance ratio (B, T) at the token or (GSPO-token) sequence level."""
    token_lr = logp - old_logp.detach()  # (B, T)
    if level == "token":
        return token_lr
    seq_lr = masked_mean(token_lr, mask, dim=1)  # (B,) = log s_i
    return seq_lr.detach()[:, None] + logp - logp.detach()  # (B, T): value log s_i, grad of logp_t


def _clipped_pg(
    ratio: torch.Tensor, adv: torch.Tensor, cfg: PolicyLossConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token clipped loss (B, T), clip indicator (B, T) and dual-clip indicator (B, T) or None."""
    pg1 = -adv * ratio  # (B, T)
    pg2 = -adv * ratio.clamp(1.0 - cfg.eps_clip, 1.0 + cfg.clip_high)  # (B, T)
    pg = torch.maximum(pg1, pg2)  # (B, T)
    clipped = pg2 > pg1  # (B, T)
    if cfg.eps_clip_c is None:
        return pg, clipped, None
    pg3 = -adv * cfg.eps_clip_c  # (B, T)
    dual = (adv < 0) & (pg > pg3)  # (B, T)
    return torch.where(dual, pg3, pg), clipped, dual


def _regularisers(
    logp: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
    ref_logp: torch.Tensor | None,
    entropy: torch.Tensor | None,
    metrics: dict[str, float],
) -> torch.Tensor:
    """kl_coef * KL(pi || ref) - entropy_coef * entropy (masked means, a 0-d tensor); fills `metrics`.

    The KL / entropy metrics are logged whenever ref_logp / entropy are given, even with a zero coefficient.
    """
    total = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if ref_logp is not None:
        check_same_shape(logp=logp, ref_logp=ref_logp)
        ref = zero_masked(ref_logp.detach(), mask)  # (B, T)
        kl_loss = masked_mean(kl_estimate(logp, ref, cfg.kl_type), mask)  # ()
        metrics["train/kl_loss"] = kl_loss.item()
        if cfg.kl_coef > 0.0:
            total = total + cfg.kl_coef * kl_loss
    if entropy is not None:
        check_same_shape(logp=logp, entropy=entropy)
        ent = masked_mean(entropy, mask)  # ()
        metrics["train/entropy"] = ent.item()
        if cfg.entropy_coef > 0.0:
            total = total - cfg.entropy_coef * ent
    return total


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    cfg: PolicyLossConfig,
    *,
    ref_logp: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy-gradient loss (scalar) and metrics; see the module docstring and `PolicyLoss`."""
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)  # (B,) -> (B, T)
    check_same_shape(logp=logp, old_logp=old_logp, advantages=advantages, loss_mask=loss_mask)
    if cfg.kl_coef > 0.0 and ref_logp is None:
        raise ValueError(f"kl_coef={cfg.kl_coef} > 0 needs ref_logp, got None")
    mask = loss_mask.bool()  # (B, T)
    # zero the padding first, so inf / NaN there can reach neither the loss nor the gradient
    logp, old_logp = zero_masked(logp, mask), zero_masked(old_logp.detach(), mask)  # (B, T)
    adv = zero_masked(advantages.detach().to(logp.dtype), mask)  # (B, T)

    ratio = torch.exp(_log_ratio(logp, old_logp, mask, cfg.level))  # (B, T)
    pg, clipped, dual = _clipped_pg(ratio, adv, cfg)
    if token_weights is not None:
        check_same_shape(logp=logp, token_weights=token_weights)
        pg = pg * zero_masked(token_weights.detach().to(pg.dtype), mask)
    loss = pg_loss = masked_mean(pg, mask)  # ()

    f32 = torch.float32
    metrics = {
        "train/pg_loss": pg_loss.item(),
        "train/pg_clipfrac": masked_mean(clipped.to(f32), mask).item(),
        "train/ppo_kl": masked_mean((old_logp - logp).detach().to(f32), mask).item(),
    }
    if dual is not None:
        metrics["train/dual_clipfrac"] = masked_mean(dual.to(f32), mask).item()
    loss = loss + _regularisers(logp, mask, cfg, ref_logp, entropy, metrics)
    return loss, metrics
