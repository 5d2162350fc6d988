"""Masked reductions shared by the algorithm modules.

Every per-token quantity in `glm_rl.algo` is a (B, T) tensor paired with a 0/1 `loss_mask` of the same
shape (1 = a response token that counts). A "masked mean" is sum(x * mask) / clamp(sum(mask), min=1), so an
all-zero mask gives 0 rather than NaN. Positions where the mask is 0 are selected away with `torch.where`
instead of multiplied by 0, so padding that holds inf or NaN cannot leak into a result. Use `zero_masked`
on inputs *before* non-linear ops (exp, ...) to keep such padding out of gradients too.
"""

from __future__ import annotations

import torch


def zero_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask is set, 0 elsewhere; the gradient at masked-out entries is exactly 0 (never NaN)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) over `dim` (all elements when None); masked-out entries contribute exactly 0."""
    kept = zero_masked(x, mask)
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / clamp(sum(mask), min=1) over `dim` (all elements when None)."""
    count = mask.to(x.dtype if x.is_floating_point() else torch.float32)
    count = count.sum() if dim is None else count.sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Largest x over masked entries, a 0-d tensor; 0 when nothing is masked in."""
    if not bool(mask.bool().any()):
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return x[mask.bool()].max()


def check_same_shape(**tensors: torch.Tensor) -> None:
    """Raise ValueError naming every argument when the given tensors do not all share one shape."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: {listed}")
