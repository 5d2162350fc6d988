"""The embedded engine's decode paths and `run_batch`, the one place that picks between them.

Why one dispatcher: a batch is a pure function of (model, requests) — no threads, no HTTP — whichever cache and
whether speculative, so the engine, the tests and benchmarks/engine_decode.py all call `run_batch` and get rows
of the same meaning back.

| cache (`decoder`)                      | plain (`mtp=None`)       | MTP speculative (`mtp`, `num_steps`)      |
| HF DynamicCache (None)                 | `dynamic.run_dynamic`    | `speculative.run_speculative`             |
| preallocated, CUDA-graphed (`static`)  | `static.run_static`      | `static_speculative.run_static_speculative` |

Shared pieces: `loop.py` (the plain emit / stop / step loop), `spec_rules.py` (draft and accept),
`cached_model.py` + `graphs.py` (what `static.StaticDecoder` runs and how it captures it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from glm_rl.engine.batch import GenerationRequest, Row, SpecRow, new_rows
from glm_rl.engine.decode.dynamic import run_dynamic
from glm_rl.engine.decode.speculative import run_speculative
from glm_rl.engine.decode.static import StaticDecoder, run_static
from glm_rl.engine.decode.static_speculative import run_static_speculative


@torch.no_grad()
def run_batch(
    model,
    requests: list[GenerationRequest],
    *,
    eos_ids: Iterable[int],
    pad_id: int,
    gates: list[torch.nn.Module],
    should_abort: Callable[[], bool],
    decoder: StaticDecoder | None = None,
    mtp=None,
    num_steps: int = 1,
) -> list[Row]:
    """Generate for every request in one batch; rows come back finished (stop / length / abort). With a
    `StaticDecoder` the batch runs over its preallocated cache, else over DynamicCaches; with `mtp` (HF's
    MtpModel) through MTP speculative decoding, `num_steps` drafts per verify forward (rows are `SpecRow`s, and
    the decoder must have been built with `mtp=mtp`)."""
    common = dict(pad_id=pad_id, should_abort=should_abort)
    if mtp is None:
        rows = new_rows(model, requests, eos_ids)
        if decoder is not None:
            return run_static(decoder, rows, **common)
        return run_dynamic(model, rows, gates=gates, **common)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if decoder is not None and decoder.mtp is not mtp:
        raise ValueError(
            "run_batch: the StaticDecoder must be built with this MTP module (StaticDecoder(model, ..., mtp=mtp))"
        )
    if decoder is not None and len(requests) > decoder.max_batch:
        raise ValueError(
            f"run_batch: {len(requests)} requests exceed the StaticDecoder's max_batch={decoder.max_batch}"
        )
    rows = new_rows(model, requests, eos_ids, SpecRow)
    if decoder is not None:
        return run_static_speculative(decoder, rows, num_steps=num_steps, **common)
    return run_speculative(model, mtp, rows, num_steps=num_steps, gates=gates, **common)
