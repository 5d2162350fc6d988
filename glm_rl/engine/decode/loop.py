"""The plain (non-speculative) decode loop, written once for both caches: emit, stop, step.

Why a loop over a `Steps` object: the HF DynamicCache path (`dynamic.py`) and the preallocated cache
(`static.py`) differ only in how a step runs and whether the next one can be queued before the host reads this
one's tokens; emitting, stopping and aborting are the same code (`batch.py`), so both paths return the same rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from glm_rl.engine.batch import HostCopy, Row, emit_rows, survivors
from glm_rl.engine.sampling import sample_rows


class Steps(Protocol):
    """The cache-specific half of the loop. `first()`: the prefill's sampled (tokens, logprobs), on the device.
    `ahead(active, out)`: may queue the next step for every active row before the host has looked at `out`.
    `collect(active, keep, pending)`: the next step's (tokens, logprobs) for the rows `keep` (indexes into
    `active`) that did not finish — the queued step's rows, or a step run now."""

    def first(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def ahead(self, active: list[int], out: tuple[torch.Tensor, torch.Tensor]) -> Any: ...
    def collect(self, active: list[int], keep: list[int], pending: Any) -> tuple[torch.Tensor, torch.Tensor]: ...


def run_steps(rows: list[Row], steps: Steps, should_abort: Callable[[], bool]) -> list[Row]:
    """Emit, stop and step until every row finished (the host's bookkeeping overlaps the GPU's queued step)."""
    active, out = list(range(len(rows))), steps.first()
    while True:
        fetched = HostCopy(*out)
        pending = steps.ahead(active, out)
        emit_rows(rows, active, fetched)
        keep = survivors(rows, active, should_abort)
        if not keep:
            return rows
        out = steps.collect(active, keep, pending)
        active = [active[b] for b in keep]


def step_rows(rows: list[Row], active: list[int], logits: torch.Tensor) -> None:
    """Sample one token for every active row and mark the rows that finish."""
    emit_rows(rows, active, HostCopy(*sample_rows(rows, active, logits)))
