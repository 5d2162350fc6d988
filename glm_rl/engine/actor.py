"""The embedded engine as a Ray actor: `engine_actor_class(...)` → `ray.remote(...)(EmbeddedEngine)`.

Why a function: building the actor class needs Ray, which importing the engine does not; `EmbeddedEngineActor`
(the default options) is built on first use.
"""

from __future__ import annotations

from typing import Any

from glm_rl.engine.engine import EmbeddedEngine


def engine_actor_class(num_cpus: float = 1, **options: Any):
    """`ray.remote(...)(EmbeddedEngine)`: `a = cls.remote(config); url = ray.get(a.start.remote())`."""
    import ray

    return ray.remote(num_cpus=num_cpus, **options)(EmbeddedEngine)


def __getattr__(name: str) -> Any:
    """`EmbeddedEngineActor`: `engine_actor_class()`, built on first use so importing this module needs no Ray."""
    if name == "EmbeddedEngineActor":
        return engine_actor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
