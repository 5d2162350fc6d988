"""Sequence-level advantage estimators for group-sampled RL (one prompt, `group_size` responses).

Rewards arrive group-contiguous: the N = n_groups * group_size entries of `rewards` (N,) are
[g0r0, g0r1, ..., g0r{K-1}, g1r0, ...]. Each estimator compares a response with its own group only.

- GRPO (Shao et al. 2024, DeepSeekMath, sec. 4.1.2, outcome supervision):
  A_i = (r_i - mean(r_group)) / (std(r_group) + eps), std unbiased (correction=1, torch.std's default).
- GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization") uses the same group-normalised
  advantage; only the importance ratio differs (see `losses.py`), so `gspo_advantages` is GRPO's.
- Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-like Training: A Critical Perspective"):
  A_i = r_i - mean(r_group); dividing by the std biases updates towards too-easy / too-hard prompts
  (question-level difficulty bias), so it is dropped.

The results are detached sequence-level (N,) tensors; `broadcast_to_tokens` lays them onto (B, T).
"""

from __future__ import annotations

import torch

ESTIMATORS = ("grpo", "gspo", "dr_grpo")


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """View (N,) rewards as (n_groups, group_size) float32, validating the layout."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    n = rewards.numel()
    if n % group_size != 0:
        raise ValueError(
            f"number of rewards N={n} is not a multiple of group_size={group_size} "
            f"(rewards must be laid out group-contiguous, N = n_groups * group_size)"
        )
    return rewards.detach().to(torch.float32).reshape(n // group_size, group_size)  # (G, K)


def grpo_advantages(
    rewards: torch.Tensor, group_size: int, *, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO advantages (N,): (r - group mean) / (unbiased group std + eps); mean-only if not normalize_std."""
    grouped = _grouped(rewards, group_size)  # (G, K)
    centered = grouped - grouped.mean(dim=1, keepdim=True)  # (G, K)
    if normalize_std:
        if group_size < 2:
            raise ValueError(
                f"group_size={group_size}: the unbiased std needs at least 2 responses per group; "
                "use normalize_std=False or a larger group"
            )
        std = grouped.std(dim=1, keepdim=True)  # (G, 1), correction=1
        centered = centered / (std + eps)
    return centered.reshape(-1)  # (N,)


def dr_grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr.GRPO advantages (N,): r - group mean, with no std division (Liu et al. 2025)."""
    return grpo_advantages(rewards, group_size, normalize_std=False)


def gspo_advantages(
    rewards: torch.Tensor, group_size: int, *, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GSPO advantages (N,): identical to GRPO's group-normalised rewards (Zheng et al. 2025)."""
    return grpo_advantages(rewards, group_size, normalize_std=normalize_std, eps=eps)


def compute_advantages(estimator: str, rewards: torch.Tensor, group_size: int, **kw) -> torch.Tensor:
    """Dispatch by name to one of ESTIMATORS; extra keywords go to the estimator."""
    match estimator:
        case "grpo":
            return grpo_advantages(rewards, group_size, **kw)
        case "gspo":
            return gspo_advantages(rewards, group_size, **kw)
        case "dr_grpo":
            return dr_grpo_advantages(rewards, group_size, **kw)
        case _:
            raise ValueError(f"unknown advantage estimator {estimator!r}; valid estimators: {', '.join(ESTIMATORS)}")


def broadcast_to_tokens(adv: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Copy each sequence's advantage (B,) onto its tokens: (B, T), zero where loss_mask is 0."""
    if adv.dim() != 1 or loss_mask.dim() != 2 or adv.shape[0] != loss_mask.shape[0]:
        raise ValueError(
            f"expected adv (B,) and loss_mask (B, T) with the same B, got {tuple(adv.shape)} "
            f"and {tuple(loss_mask.shape)}"
        )
    mask = loss_mask.to(torch.float32)  # (B, T)
    return adv.to(torch.float32)[:, None] * mask  # (B, T)
