"""Flattened weights: a module's tensors as views into one contiguous byte buffer.

Why: the colocated `tensor` transport then shares the whole model as ONE CUDA IPC handle (or one shared-memory
file on CPU) with a small layout, instead of a handle per tensor and a copy per bucket; the engine copies
straight out of the trainer's storage. The trainer flattens its model once (`flatten_module_`: parameters and
persistent buffers become views; identities, and so optimizer state, are kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALIGN = 64  # bytes; every view starts aligned so `.view(dtype)` is legal


@dataclass(frozen=True)
class FlatEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # bytes from the buffer's start

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


def plan_layout(named: list[tuple[str, torch.Tensor]]) -> tuple[list[FlatEntry], int]:
    entries, offset = [], 0
    for name, t in named:
        entries.append(FlatEntry(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset))
        offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return entries, offset


def views(flat: torch.Tensor, entries: list[FlatEntry]) -> list[tuple[str, torch.Tensor]]:
    """(name, view) for each entry of a uint8 buffer laid out by `plan_layout`."""
    return [(e.name, flat[e.offset : e.offset + e.nbytes].view(getattr(torch, e.dtype)).view(e.shape)) for e in entries]


def flatten_module_(module: torch.nn.Module) -> tuple[torch.Tensor, list[FlatEntry]]:
    """Move every tensor of `module.state_dict()` into one uint8 buffer (on their device); in place."""
    owners = {}
    for prefix, sub in module.named_modules():
        for attr, t in list(sub._parameters.items()) + list(sub._buffers.items()):
            if t is not None:
                owners[f"{prefix}.{attr}" if prefix else attr] = (sub, attr)
    named = [(n, t) for n, t in module.state_dict(keep_vars=True).items()]
    entries, total = plan_layout(named)
    flat = torch.zeros(total, dtype=torch.uint8, device=named[0][1].device)
    for (name, t), (_, view) in zip(named, views(flat, entries)):
        view.copy_(t.detach())
        sub, attr = owners[name]
        if attr in sub._parameters:
            sub._parameters[attr].data = view
        else:
            sub._buffers[attr] = view
    return flat, entries


def entries_to_json(entries: list[FlatEntry]) -> list[list]:
    return [[e.name, e.dtype, list(e.shape), e.offset] for e in entries]


def entries_from_json(rows: list[list]) -> list[FlatEntry]:
    return [FlatEntry(str(n), str(d), tuple(int(x) for x in s), int(o)) for n, d, s, o in rows]
