"""The device digest (`digest.py`) as one Triton kernel: what `tensor_digest` runs for a CUDA tensor.

Why: the torch form is ~25 elementwise int64 kernels per 64 Mi words, each reading and writing 8 bytes a word,
plus a host synchronisation per chunk and lane: 2.1 GB of bf16 took 98 ms on an H100, twice per sync (the
trainer's side and the engine's), against ~1 ms to read the bytes once. Here each block of words is loaded once,
mixed in registers and reduced to two int64 partial sums; one small sum and one copy to the host finish it.
The arithmetic is the torch form's, int64 wrapping included, so the digest is bit for bit the same (tested under
Triton's interpreter on CPU, `tests/test_weights_digest.py`). Imported only when a CUDA tensor is digested.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # words per program


@triton.jit
def _mix(x, m1, m2, s1: tl.constexpr, s2: tl.constexpr, s3: tl.constexpr):
    """digest._mix: splitmix64's finaliser on int64, logical shifts by masking the sign-extended bits."""
    x = x ^ ((x >> s1) & ((1 << (64 - s1)) - 1))
    x = x * m1
    x = x ^ ((x >> s2) & ((1 << (64 - s2)) - 1))
    x = x * m2
    return x ^ ((x >> s3) & ((1 << (64 - s3)) - 1))


@triton.jit
def _digest_blocks(words, n, partial, phi, a1, a2, b1, b2, BLOCK: tl.constexpr):
    """partial[pid] = (lane-0 sum, lane-1 sum) of mix(w_i + i * phi) over this program's words."""
    pid = tl.program_id(0)
    index = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = index < n
    w = tl.load(words + index, mask=inside, other=0).to(tl.int64) & 0xFFFFFFFF  # the uint32 word
    x = w + index * phi
    tl.store(partial + pid * 2, tl.sum(tl.where(inside, _mix(x, a1, a2, 30, 27, 31), 0), axis=0))
    tl.store(partial + pid * 2 + 1, tl.sum(tl.where(inside, _mix(x, b1, b2, 33, 29, 32), 0), axis=0))


def lane_sums(words: torch.Tensor, phi: int, lanes: tuple) -> list[int]:
    """The two lane sums (mod 2^64) of int32 `words` (the tensor's bytes), on the words' device."""
    (a1, a2, *shifts_a), (b1, b2, *shifts_b) = lanes
    if tuple(shifts_a) != (30, 27, 31) or tuple(shifts_b) != (33, 29, 32):
        raise ValueError("digest_triton: the kernel's shifts differ from digest._LANES")
    n = words.numel()
    blocks = max(1, triton.cdiv(n, BLOCK))
    partial = torch.empty((blocks, 2), dtype=torch.int64, device=words.device)
    _digest_blocks[(blocks,)](words, n, partial, phi, a1, a2, b1, b2, BLOCK=BLOCK)
    return [s % (1 << 64) for s in partial.sum(0).tolist()]  # int64 sums wrap, as the torch form's
