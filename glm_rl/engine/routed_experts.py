"""Routed experts (R3) on the wire: one base64 buffer per request, never JSON numbers.

Two forms arrive in `meta_info["routed_experts"]`:
- SGLang's (>= 0.5, `--enable-return-routed-experts`): base64 of int32 ids, flattened (positions,
  num_hidden_layers, top_k) — every decoder layer, dense ones included (their slots carry no routing);
- the embedded engine's (`meta_info["routed_experts_format"]` describes it): base64 of uint8 ids (int16 beyond
  256 experts), (positions, MoE layers, top_k) — 1 byte per id where JSON took ~3 and a Python object each.
`decode` turns either (or a plain nested list, from older engines) into the (positions, MoE layers, top_k) int16
array R3 replays; the client decodes each answer once, on arrival. sglang-router passes both through unchanged.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

FORMAT_KEY = "routed_experts_format"


@dataclass(frozen=True)
class RoutingLayout:
    """Which decoder layers route (MoE) and how many experts each token picks: what SGLang's form needs."""

    num_layers: int
    moe_layers: tuple[int, ...]
    top_k: int

    @classmethod
    def of(cls, config: Any) -> RoutingLayout:
        """From an HF GLM-4.5 config: layers from `first_k_dense_replace` on are MoE."""
        n = int(config.num_hidden_layers)
        first = int(getattr(config, "first_k_dense_replace", 0) or 0)
        return cls(num_layers=n, moe_layers=tuple(range(first, n)), top_k=int(config.num_experts_per_tok))


def encode(ids: torch.Tensor) -> dict[str, Any]:
    """The embedded engine's form of (positions, MoE layers, top_k) expert ids: the meta_info entries."""
    dtype = torch.uint8 if ids.numel() == 0 or int(ids.max()) < 256 else torch.int16
    raw = ids.to(device="cpu", dtype=dtype).contiguous().numpy().tobytes()
    return {
        "routed_experts": base64.b64encode(raw).decode("ascii"),
        FORMAT_KEY: {"dtype": str(dtype).removeprefix("torch."), "shape": list(ids.shape)},
    }


def encode_sglang(ids: torch.Tensor, layout: RoutingLayout) -> dict[str, Any]:
    """SGLang's form of the same ids: int32 over every decoder layer (dense layers' slots 0)."""
    rows = torch.zeros(ids.shape[0], layout.num_layers, layout.top_k, dtype=torch.int32)
    if ids.numel():
        rows[:, list(layout.moe_layers)] = ids.to(device="cpu", dtype=torch.int32)
    return {"routed_experts": base64.b64encode(rows.numpy().tobytes()).decode("ascii")}


def decode(meta: dict[str, Any], layout: RoutingLayout | None = None) -> np.ndarray:
    """(positions, MoE layers, top_k) int16 from an answer's meta_info, whichever form it carries. SGLang's form
    needs the model's `layout`; a size that does not fit it raises, naming the sizes."""
    value = meta["routed_experts"]
    if isinstance(value, np.ndarray):  # decoded already
        return value
    if not isinstance(value, str):  # nested lists
        return np.asarray(value, dtype=np.int16)
    raw = base64.b64decode(value)
    fmt = meta.get(FORMAT_KEY)
    if fmt is not None:
        return np.frombuffer(raw, dtype=np.dtype(fmt["dtype"])).reshape(fmt["shape"]).astype(np.int16)
    if layout is None:
        raise ValueError("routed_experts in SGLang's form (int32, every layer) needs the model's RoutingLayout")
    flat = np.frombuffer(raw, dtype=np.int32)
    per_position = layout.num_layers * layout.top_k
    if flat.size % per_position:
        raise ValueError(
            f"routed_experts: {flat.size} ids is not a multiple of num_hidden_layers x top_k = {per_position}"
        )
    rows = flat.reshape(-1, layout.num_layers, layout.top_k)
    return rows[:, list(layout.moe_layers)].astype(np.int16)
