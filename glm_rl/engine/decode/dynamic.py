"""Plain decoding over HF's DynamicCache: the engine's path with `static_kv_cache=False`, and the reference the
static cache is tested against.

Left padding + attention mask + position ids (cumsum of the mask) for the prefill, then one token per row per
step; rows that finish are dropped from the cache (`batch_select_indices`). No run-ahead: the cache grows by
concatenation, so every step waits for the host anyway. Routed experts come from `RouterCapture` hooks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache

from glm_rl.engine.batch import RouterCapture, Row
from glm_rl.engine.decode.loop import run_steps
from glm_rl.engine.sampling import sample_rows


def prefill_logits(model, rows: list[Row], pad_id: int, cache: DynamicCache, capture: RouterCapture | None):
    """Left-padded prompts through the model into `cache`; (last-position logits [B, V], attention mask)."""
    lengths = [len(r.req.input_ids) for r in rows]
    width, dev = max(lengths), model.device
    ids = torch.tensor([[pad_id] * (width - n) + list(r.req.input_ids) for r, n in zip(rows, lengths)], device=dev)
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], device=dev)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    if capture is not None:
        routed = capture.pop()
        for b, (row, n) in enumerate(zip(rows, lengths)):
            row.routed.append(routed[b, width - n :])
    return out.logits[:, -1], mask


def decode_logits(
    model, rows: list[Row], active: list[int], cache: DynamicCache, mask: torch.Tensor, capture: RouterCapture | None
):
    """Each active row's last token through the model; (logits [n, V], the grown attention mask)."""
    ids = torch.tensor([[rows[i].output_ids[-1]] for i in active], device=mask.device)
    positions = torch.tensor(
        [[len(rows[i].req.input_ids) + len(rows[i].output_ids) - 1] for i in active], device=mask.device
    )
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    if capture is not None:
        routed = capture.pop()
        for b, i in enumerate(active):
            rows[i].routed.append(routed[b])
    return out.logits[:, -1], mask


class DynamicSteps:
    """`loop.Steps` over an HF DynamicCache (left-padded prefill; finished rows dropped from the cache)."""

    def __init__(self, model, rows: list[Row], pad_id: int, capture: RouterCapture | None) -> None:
        self.model, self.rows, self.pad_id, self.capture = model, rows, pad_id, capture
        self.cache = DynamicCache(config=model.config)

    def first(self) -> tuple[torch.Tensor, torch.Tensor]:
        logits, self.mask = prefill_logits(self.model, self.rows, self.pad_id, self.cache, self.capture)
        return sample_rows(self.rows, list(range(len(self.rows))), logits)

    def ahead(self, active: list[int], out) -> None:
        return None

    def collect(self, active: list[int], keep: list[int], pending: None) -> tuple[torch.Tensor, torch.Tensor]:
        if len(keep) < len(active):
            self.cache.batch_select_indices(torch.tensor(keep, device=self.mask.device))
            self.mask = self.mask[keep]
        live = [active[b] for b in keep]
        logits, self.mask = decode_logits(self.model, self.rows, live, self.cache, self.mask, self.capture)
        return sample_rows(self.rows, live, logits)


@torch.no_grad()
def run_dynamic(
    model, rows: list[Row], *, pad_id: int, gates: list[torch.nn.Module], should_abort: Callable[[], bool]
) -> list[Row]:
    """Decode `rows` to the end over a DynamicCache; routed experts are captured only if a request asks."""
    capture = RouterCapture(gates) if any(r.req.return_routed_experts for r in rows) else None
    try:
        return run_steps(rows, DynamicSteps(model, rows, pad_id, capture), should_abort)
    finally:
        if capture is not None:
            capture.remove()
