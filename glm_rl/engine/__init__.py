"""Rollout engines behind SGLang's native HTTP API, and the client that drives them.

- `client`: `EngineClient`, `serialize_named_tensors`, `create_weight_group` / `WeightGroup`, `tensor_checksum`
  (light imports: torch, urllib; aiohttp on first async call).
- `embedded`: `EngineConfig`, `EmbeddedEngine` (torch engine over the HF model), `engine_actor_class` /
  `EmbeddedEngineActor` (Ray).
  Imports transformers, so it is loaded only when one of its names is used.
"""

from __future__ import annotations

from typing import Any

from glm_rl.rollout.engine_client import (EngineClient, EngineError, WeightGroup, create_weight_group,
                                           serialize_named_tensors, tensor_checksum)

_EMBEDDED = ("EmbeddedEngine", "EmbeddedEngineActor", "EngineConfig", "engine_actor_class")

__all__ = ["EngineClient", "EngineError", "WeightGroup", "create_weight_group", "serialize_named_tensors",
           "tensor_checksum", *_EMBEDDED]


def __getattr__(name: str) -> Any:
    if name in _EMBEDDED:
        from glm_rl.engine import engine as embedded

        return getattr(embedded, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
