"""Per-token log-probabilities (and entropy) of the targets from vocab-parallel logits, without an fp32 copy.

The RL loss needs log p(target) and, with an entropy bonus, the entropy, at temperature T, from logits split
over TP ranks by vocab (B, T, V/TP), usually bf16. Upcasting the whole tensor and running Megatron's
cross-entropy costs ~10 passes over B·T·V fp32 elements (27 % of a 1 B-param model's training step on an H100,
benchmarks/RESULTS.md) and a V-wide fp32 copy of memory. Here the logits are read in row chunks:

    forward   pass 1: row max m            (all-reduced over TP: MAX)
              pass 2: Σ e^(z−m), Σ e^(z−m)·z, z[target]   (all-reduced: SUM)
    backward  one pass: d z = g·(onehot − p) + h·p·(E_p[z] − z), in the logits' dtype

with z = logits / T in fp32 inside each chunk. On CUDA the per-chunk math is `torch.compile`d into fused
reductions (one read of the bf16 chunk per pass); elsewhere it runs eagerly (same numbers).
logp = z[t] − log Z and entropy = log Z − E_p[z], as glm_rl.algo computes them from full logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

CHUNK_ROWS = 2048


def _row_max(x: torch.Tensor, inv_t: float) -> torch.Tensor:
    return (x.float() * inv_t).amax(dim=-1)


def _row_sums(x: torch.Tensor, m: torch.Tensor, inv_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    z = x.float() * inv_t
    e = torch.exp(z - m[:, None])
    return e.sum(-1), (e * z).sum(-1)


def _row_grad(
    x: torch.Tensor,
    lse: torch.Tensor,
    mean_z: torch.Tensor,
    g: torch.Tensor,
    h: torch.Tensor,
    local_t: torch.Tensor,
    inv_t: float,
) -> torch.Tensor:
    z = x.float() * inv_t
    p = torch.exp(z - lse[:, None])
    hit = torch.arange(x.shape[-1], device=x.device)[None, :] == local_t[:, None]  # never true off this shard
    dz = g[:, None] * (hit.float() - p) + h[:, None] * p * (mean_z[:, None] - z)
    return (dz * inv_t).to(x.dtype)


_KERNELS: dict[bool, tuple] = {}


def _kernels(cuda: bool) -> tuple:
    """(row_max, row_sums, row_grad): compiled on CUDA (fused single-pass reductions), eager otherwise."""
    if cuda not in _KERNELS:
        fns = (_row_max, _row_sums, _row_grad)
        _KERNELS[cuda] = tuple(torch.compile(f, dynamic=True) for f in fns) if cuda else fns
    return _KERNELS[cuda]


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _VocabParallelLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_start, temperature, group):
        row_max, row_sums, _ = _kernels(logits.is_cuda)
        x = logits.reshape(-1, logits.shape[-1])
        t = targets.reshape(-1)
        inv_t = 1.0 / temperature
        width = x.shape[-1]
        local_t = t - vocab_start
        owned = (local_t >= 0) & (local_t < width)
        local_t = torch.where(owned, local_t, torch.full_like(local_t, -1))
        chunks = range(0, x.shape[0], CHUNK_ROWS)
        m = torch.cat([row_max(x[i : i + CHUNK_ROWS], inv_t) for i in chunks]) if x.shape[0] else x.new_zeros(0).float()
        _all_reduce(m, dist.ReduceOp.MAX, group)
        sums = [row_sums(x[i : i + CHUNK_ROWS], m[i : i + CHUNK_ROWS], inv_t) for i in chunks]
        stats = (
            torch.stack([torch.cat([s[0] for s in sums]), torch.cat([s[1] for s in sums])])
            if sums
            else m.new_zeros(2, 0)
        )
        z_t = torch.where(owned, x.gather(-1, local_t.clamp(min=0)[:, None]).squeeze(-1).float() * inv_t, 0.0)
        stats = _all_reduce(torch.cat([stats, z_t[None]]), dist.ReduceOp.SUM, group)
        s, sz, z_t = stats
        lse = m + torch.log(s)
        mean_z = sz / s
        ctx.save_for_backward(logits, local_t, lse, mean_z)
        ctx.inv_t = inv_t
        shape = targets.shape
        return (z_t - lse).reshape(shape), (lse - mean_z).reshape(shape)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, local_t, lse, mean_z = ctx.saved_tensors
        *_, row_grad = _kernels(logits.is_cuda)
        x = logits.reshape(-1, logits.shape[-1])
        g = torch.zeros_like(lse) if grad_logp is None else grad_logp.reshape(-1).float()
        h = torch.zeros_like(lse) if grad_entropy is None else grad_entropy.reshape(-1).float()
        out = torch.empty_like(x)
        for i in range(0, x.shape[0], CHUNK_ROWS):
            j = slice(i, i + CHUNK_ROWS)
            out[j] = row_grad(x[j], lse[j], mean_z[j], g[j], h[j], local_t[j], ctx.inv_t)
        return out.reshape(logits.shape), None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0, vocab_start: int = 0, group=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(targets), entropy), each shaped like `targets`, of softmax(logits / temperature) over the full
    vocab; `logits` (..., V_local) hold this rank's vocab shard starting at global id `vocab_start`, `group`
    is the TP group (None: the whole vocab is here). Differentiable in both outputs."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree")
    return _VocabParallelLogprob.apply(logits, targets, vocab_start, float(temperature), group)
