"""The device-side weight digest (`glm_rl/weights/digest.py`): equal to an independent pure-Python reference of
the same definition, sensitive to every kind of corruption a transfer could cause, independent of chunking and
of the device (the GPU test), and used by both ends of a verification (`wire.tensor_checksum(..., "d128")`)."""

from __future__ import annotations

import struct

import pytest
import torch

from glm_rl.weights import digest
from glm_rl.weights.digest import tensor_digest
from glm_rl.weights.wire import checksum_algo, tensor_checksum

M64 = (1 << 64) - 1


def _mix_ref(x: int, m1: int, m2: int, s1: int, s2: int, s3: int) -> int:
    x ^= x >> s1
    x = (x * m1) & M64
    x ^= x >> s2
    x = (x * m2) & M64
    return x ^ (x >> s3)


def digest_ref(t: torch.Tensor) -> str:
    """The definition, on unsigned Python integers: words w_i (little-endian uint32 of the bytes, zero-padded),
    x_i = w_i + i * 0x9E3779B97F4A7C15 mod 2^64, two lanes of splitmix64 finalisers summed mod 2^64; the first
    lane xor-ed with the dtype|shape tag."""
    raw = t.contiguous().reshape(-1).view(torch.uint8).tolist()
    raw += [0] * (-len(raw) % 4)
    words = struct.unpack(f"<{len(raw) // 4}I", bytes(raw))
    lanes = [(0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 30, 27, 31), (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 33, 29, 32)]
    sums = [0, 0]
    for i, w in enumerate(words):
        x = (w + i * 0x9E3779B97F4A7C15) & M64
        for k, c in enumerate(lanes):
            sums[k] = (sums[k] + _mix_ref(x, *c)) & M64
    head = f"{t.dtype}|{tuple(t.shape)}".encode()
    tag = sum(b << (8 * (i % 8)) for i, b in enumerate(head)) & M64
    return f"{sums[0] ^ tag:016x}{sums[1]:016x}"


@pytest.mark.parametrize(
    "t",
    [
        torch.arange(10, dtype=torch.float32),
        torch.randn(7, 3).to(torch.bfloat16),
        torch.tensor([1, 2, 3], dtype=torch.uint8),
        torch.zeros(0),
        torch.randn(5, 4)[:, 1],
    ],
)  # a non-contiguous view: its values, not its storage
def test_matches_the_pure_python_definition(t):
    assert tensor_digest(t) == digest_ref(t)


def test_sensitive_to_bits_order_dtype_and_shape():
    a = torch.randn(64, 33)
    base = tensor_digest(a)
    flipped = a.clone()
    flipped.view(-1).view(torch.int32)[1000] ^= 1 << 7
    swapped = a.clone().view(-1)
    swapped[[3, 4]] = swapped[[4, 3]]
    variants = [flipped, swapped.view(64, 33), a.reshape(33, 64), a.view(torch.int32), a.to(torch.float64)]
    assert len({base, *map(tensor_digest, variants)}) == 1 + len(variants)
    assert tensor_digest(a.clone()) == base


def test_chunking_does_not_change_the_digest(monkeypatch):
    a = torch.randn(1001)
    whole = tensor_digest(a)
    monkeypatch.setattr(digest, "_CHUNK", 17)
    assert tensor_digest(a) == whole == digest_ref(a)


def test_checksum_algorithms():
    cpu = [torch.ones(3)]
    assert checksum_algo(cpu) == "sha256"
    assert tensor_checksum(cpu[0], "d128") == "d128:" + tensor_digest(cpu[0])
    assert len(tensor_checksum(cpu[0])) == 64
    with pytest.raises(ValueError, match="algo"):
        tensor_checksum(cpu[0], "md5")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_digest_on_gpu_and_cpu():
    a = torch.randn(3, 1 << 20, dtype=torch.bfloat16)
    assert tensor_digest(a.cuda()) == tensor_digest(a)
    assert checksum_algo([a.cuda()]) == "d128"


def test_triton_kernel_equals_the_torch_form_under_the_interpreter():
    """The CUDA path (`digest_triton.py`, one Triton kernel) gives the torch form's digest bit for bit: run here
    under Triton's CPU interpreter (a subprocess: TRITON_INTERPRET is read at import) over dtypes, odd byte
    counts, more than one program's words, negative values and views."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    script = """
import torch
from glm_rl.weights.digest import tensor_digest
g = torch.Generator().manual_seed(0)
cases = [
    torch.randn(3000, generator=g).to(torch.bfloat16),
    torch.randn(4097 * 3 + 1, generator=g),
    torch.randint(-128, 127, (7,), generator=g, dtype=torch.int8),
    torch.randn(64, 33, generator=g).t(),
    torch.tensor([-1.0, float("inf"), float("nan")], dtype=torch.float16),
    torch.zeros(0),
]
for t in cases:
    assert tensor_digest(t, kernel=True) == tensor_digest(t, kernel=False), (t.dtype, tuple(t.shape))
print("ok", len(cases))
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok 6" in out.stdout, out.stderr[-2000:]
