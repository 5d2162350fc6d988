"""The embedded rollout engine: a torch engine over the HF GLM-4.5 model behind SGLang's native HTTP API.

- `config`: `EngineConfig`. `engine`: `EmbeddedEngine`, the scheduler (batches, pause / resume, answers).
- `weights`: `EngineWeights`, every weight-update path (tensor, flat buffer, gloo group, Mooncake P2P via
  `p2p_receiver`), checksums and FP8 dequantization.
- `batch` (requests and rows), `sampling` (how tokens are drawn), `decode/` (the decode paths and
  `decode.run_batch`, which picks one).
- `http_parse` / `http_server`: the HTTP front. `actor`: `engine_actor_class` (Ray). `__main__`:
  `python -m glm_rl.engine --hf-checkpoint DIR`.
The client (`EngineClient`) is `glm_rl.rollout.engine_client`; the wire formats both sides share are
`glm_rl.weights.wire`.

`EngineConfig`, `EmbeddedEngine` and `engine_actor_class` are importable from here; the last two load the
engine (transformers, aiohttp) on first use only.
"""

from __future__ import annotations

from typing import Any

from glm_rl.engine.config import EngineConfig

__all__ = ["EmbeddedEngine", "EngineConfig", "engine_actor_class"]


def __getattr__(name: str) -> Any:
    if name == "EmbeddedEngine":
        from glm_rl.engine.engine import EmbeddedEngine

        return EmbeddedEngine
    if name == "engine_actor_class":
        from glm_rl.engine.actor import engine_actor_class

        return engine_actor_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
