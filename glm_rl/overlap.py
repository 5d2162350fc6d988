"""How a step's rollout overlaps training (config/asynchrony.py): where its batch comes from, and what the weight
sync waits for or pauses. The loop (train.py) calls the same three methods in every mode:

    get(step)   the step's samples and rollout metrics
    sync(v)     push weights version v to the engines (verified, engines restored as in every mode)
    data_state  the prompt position a checkpoint saves: nothing generated but untrained is lost or repeated

- `SyncRollouts`: rollout, then the step, then sync.
- `OneStepOff`: `get(k)` hands over rollout k (started during step k-1) and starts rollout k+1 on the weights the
  engines hold; `sync` waits for that rollout first, so batch k+1 is exactly one version old.
- `FullyAsync`: `get` takes the next batch from the rollout manager's buffer (rollout/async_buffer.py), checking
  engines while it waits; `sync` pushes while the engines generate. The embedded engine stages an update that
  arrives mid-batch and swaps it in before its next batch (engine/weights.py), so nothing waits; SGLang engines
  are paused `in_place` around the push (their running batch finishes first). With --partial-rollout every
  engine is paused `abort`, so unfinished samples continue under the new weights.
Every mode reports `rollout/staleness_mean` / `_max` (versions between each sample's oldest token and the trainer)
in the async modes, and --mask-offpolicy-in-partial-rollout drops older-version prefixes from the loss here.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray

from glm_rl.config import AsyncConfig
from glm_rl.rollout.engine_client import EngineClient
from glm_rl.rollout.samples import Sample

log = logging.getLogger(__name__)


class SyncRollouts:
    def __init__(self, rt) -> None:
        self.rt = rt

    def get(self, step: int) -> tuple[list[Sample], dict]:
        return self.rt.rollout(step)

    def sync(self, version: int) -> dict:
        return self.rt.sync_weights(version)

    def data_state(self) -> dict | None:
        return None  # the rollout manager's position is right: nothing is generated ahead

    def close(self) -> None:
        pass


class OneStepOff(SyncRollouts):
    def __init__(self, rt, num_rollout: int) -> None:
        super().__init__(rt)
        self.num_rollout = num_rollout
        self._pending: tuple[int, ray.ObjectRef, dict] | None = None  # (step, its rollout, position before it)
        self._done: tuple[int, tuple[list[Sample], dict], dict] | None = None  # waited for, not yet handed over

    def get(self, step: int) -> tuple[list[Sample], dict]:
        t0 = time.time()
        self._wait()
        if self._done is not None and self._done[0] == step:
            (_, (samples, metrics), _), self._done = self._done, None
        else:  # the first step, or the first after a resume
            samples, metrics = self.rt.rollout(step)
        metrics = metrics | {"async/trainer_wait_s": time.time() - t0}
        if step + 1 < self.num_rollout:
            manager = self.rt.rollout_manager
            position = ray.get(manager.data_state.remote())
            self._pending = (step + 1, manager.generate.remote(step + 1), position)
        return samples, metrics

    def sync(self, version: int) -> dict:
        t0 = time.time()
        self._wait()  # the next batch stays on the weights it started with
        return self.rt.sync_weights(version) | {"async/sync_wait_s": time.time() - t0}

    def data_state(self) -> dict | None:
        """Before the batch generated ahead: a resume generates it again rather than skipping its prompts."""
        ahead = self._pending or self._done
        return ahead[2] if ahead is not None else None

    def _wait(self) -> None:
        if self._pending is None:
            return
        step, ref, position = self._pending
        self._pending = None
        manager = self.rt.rollout_manager
        try:
            result = ray.get(ref)
        except (ray.exceptions.RayTaskError, RuntimeError) as e:  # engines died under it: as a sync rollout would
            if not self.rt.recovery.dead():
                raise
            log.warning("the rollout of step %d ahead failed (%s); generating it again", step + 1, e)
            ray.get(manager.load_data_state.remote(position))
            result = self.rt.rollout(step)
        self._done = (step, result, position)


class FullyAsync(SyncRollouts):
    def __init__(self, rt, cfg: AsyncConfig, engine: str, wait_s: float = 5.0) -> None:
        super().__init__(rt)
        self.cfg, self.wait_s = cfg, wait_s
        # None: push without pausing (the embedded engine stages an update that lands mid-batch)
        self.pause_mode = "abort" if cfg.partial_rollout else "in_place" if engine == "sglang" else None

    def get(self, step: int) -> tuple[list[Sample], dict]:
        manager, waited = self.rt.rollout_manager, 0.0
        while True:
            got = ray.get(manager.take_batch.remote(self.rt.weight_version, self.wait_s))
            if got is not None:
                samples, metrics = got
                return samples, metrics | {"async/trainer_wait_s": metrics["async/trainer_wait_s"] + waited}
            t0 = time.time()
            restarted = self.rt.recovery.ensure()  # waiting long: are engines dead?
            waited += time.time() - t0
            if restarted:
                log.warning("step %d: %d engines restarted while waiting for rollouts", step + 1, restarted)

    def sync(self, version: int) -> dict:
        t0 = time.time()
        if self.pause_mode is None:
            return self.rt.sync_weights(version) | {"async/pause_s": 0.0, "async/pause_wait_s": 0.0}
        self._each_engine("pausing", lambda c: c.pause(self.pause_mode))  # all at once: the wait is the slowest
        t1 = time.time()
        try:
            result = self.rt.sync_weights(version)
        finally:
            self._each_engine("continuing", lambda c: c.resume())
        return result | {"async/pause_s": time.time() - t0, "async/pause_wait_s": t1 - t0}

    def _each_engine(self, what: str, call) -> None:
        """`call(client)` on every engine concurrently; a dead engine is logged (the push or the next step's
        check restores it)."""
        clients = [EngineClient(url, self.rt.api_key) for url in self.rt.engine_urls]
        with ThreadPoolExecutor(max_workers=max(1, len(clients))) as pool:
            for client, future in [(c, pool.submit(call, c)) for c in clients]:
                try:
                    future.result()
                except Exception as e:  # noqa: BLE001 - see the docstring
                    log.warning("%s %s failed: %s", what, client.url, e)

    def data_state(self) -> dict | None:
        return None  # the manager lists its in-flight and buffered prompts itself

    def close(self) -> None:
        try:
            ray.get(self.rt.rollout_manager.stop_producer.remote(), timeout=30)
        except Exception as e:  # noqa: BLE001 - shutting down anyway
            log.warning("stopping the rollout producer failed: %s", e)


def rollouts_for(cfg, rt) -> SyncRollouts:
    """The rollout source of `cfg.asynchrony`'s loop."""
    a = cfg.asynchrony
    if a.fully_async:
        return FullyAsync(rt, a, cfg.rollout.rollout_engine)
    if a.one_step_off:
        return OneStepOff(rt, cfg.num_rollout)
    return SyncRollouts(rt)


def staleness_metrics(samples: list[Sample], trainer_version: int) -> dict[str, float]:
    """Versions between each sample's oldest token and the weights it trains (0: on-policy)."""
    lag = np.array([s.staleness(trainer_version) for s in samples])
    return {"rollout/staleness_mean": float(lag.mean()), "rollout/staleness_max": float(lag.max())}


def mask_older_versions(samples: list[Sample]) -> int:
    """--mask-offpolicy-in-partial-rollout: tokens an older version generated than the sample's last leave the loss
    (loss_mask 0). Returns how many tokens were masked."""
    masked = 0
    for s in samples:
        if not s.token_versions or min(s.token_versions) == max(s.token_versions):
            continue
        newest = max(s.token_versions)
        mask = s.loss_mask or [1] * len(s.response_ids)
        s.loss_mask = [m if v == newest else 0 for m, v in zip(mask, s.token_versions)]
        masked += sum(m and v != newest for m, v in zip(mask, s.token_versions))
    return masked
