"""Group named tensors into buckets of at most `max_bytes` (a tensor larger than that gets its own bucket),
so a sync holds at most one bucket of extra memory at a time."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def iter_buckets(named: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket
