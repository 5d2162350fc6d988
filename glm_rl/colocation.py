"""Colocation: which side of each shared GPU holds its memory in a step (--colocate, --offload-train,
--offload-rollout), called once per phase by the loop (train.py).

Why one object: trainer ranks and engines take turns on the same GPUs, so each phase must first make the other
side let go — in this order, or both sides' peaks meet:

    to_rollout()  trainer ranks offload (weights and optimizer state to pinned host memory, gradients dropped);
                  engines take their KV cache back (the embedded engine allocates it with the next batch)
    to_train()    engines release weights and KV cache (CUDA graphs too); trainer ranks onload
    to_sync()     engines take their weight memory back, undefined until the push overwrites it whole

SGLang engines do the same through their memory saver (`--enable-memory-saver`, which --colocate sets) and the
`weights` / `kv_cache` tags. A trainer rank that must push while offloaded (an engine restored mid-rollout) onloads
for the push (`TrainerActor.push_weights`). Off (nothing is called) without --colocate, on CPU-only runs (no device
memory is shared), or with --no-offload-train / --no-offload-rollout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from glm_rl.config import RunConfig
from glm_rl.rollout.engine_client import EngineClient, EngineError

log = logging.getLogger(__name__)


class Colocation:
    def __init__(self, trainers, engine_urls: list[str], api_key: str, *, train: bool, rollout: bool) -> None:
        """`engine_urls` is the runtime's live list (engines restored by recovery keep their index)."""
        self.trainers, self.engine_urls, self.api_key = trainers, engine_urls, api_key
        self.offload_train, self.offload_rollout = train, rollout

    @classmethod
    def of(cls, cfg: RunConfig, trainers, engine_urls: list[str], api_key: str, use_gpu: bool) -> Colocation:
        on = cfg.colocate and use_gpu
        train = on and cfg.offload_train is not False
        rollout = on and cfg.offload_rollout is not False
        return cls(trainers, engine_urls, api_key, train=train, rollout=rollout)

    @property
    def enabled(self) -> bool:
        return self.offload_train or self.offload_rollout

    @classmethod
    def off(cls, trainers) -> Colocation:
        return cls(trainers, [], "", train=False, rollout=False)

    def _each_engine(self, call: Callable[[EngineClient], object]) -> float:
        """`call` on every engine at once; one that does not answer is left to recovery (the next push or step
        restores it with the current weights). Returns the most device memory an engine reserves afterwards (GiB)."""

        def one(url: str) -> float:
            client = EngineClient(url, api_key=self.api_key, timeout=120)
            try:
                call(client)
                return float(client.get("/server_info").get("memory_reserved_gib", 0.0))
            except (EngineError, OSError) as e:
                log.warning("memory call on %s failed (left to engine recovery): %s", url, e)
                return 0.0

        with ThreadPoolExecutor(max(1, len(self.engine_urls))) as pool:
            return max(pool.map(one, list(self.engine_urls)), default=0.0)

    def to_rollout(self) -> dict:
        """Trainer ranks offload (memory/trainer_active_gib before, _idle_gib after), engines resume KV."""
        if not self.enabled:
            return {}
        t0, metrics = time.time(), {}
        if self.offload_train:
            metrics |= self.trainers.offload()
        if self.offload_rollout:
            self._each_engine(lambda c: c.resume_memory_occupation(["kv_cache"]))
        return metrics | {"perf/offload_s": time.time() - t0}

    def to_train(self) -> dict:
        """Engines release all (memory/engine_active_gib before, _idle_gib after), trainer ranks onload."""
        if not self.enabled:
            return {}
        t0, metrics = time.time(), {}
        if self.offload_rollout:
            metrics["memory/engine_active_gib"] = self._each_engine(lambda c: None)
            metrics["memory/engine_idle_gib"] = self._each_engine(lambda c: c.release_memory_occupation())
        t1 = time.time()
        if self.offload_train:
            self.trainers.onload()
        return metrics | {"perf/engine_release_s": t1 - t0, "perf/onload_s": time.time() - t1}

    def to_sync(self) -> dict:
        if not self.offload_rollout:
            return {}
        t0 = time.time()
        self._each_engine(lambda c: c.resume_memory_occupation(["weights"]))
        return {"perf/engine_resume_s": time.time() - t0}
