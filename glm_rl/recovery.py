"""Engine recovery: an engine that dies at any moment of a step is restarted on its placement bundle and given
the current weights before the router sends it requests again.

Where a death is seen:
- at a step's start (`ensure`): every engine's /health;
- during rollout or eval: the rollout manager retries a dying engine's requests on the others (counted in
  `rollout/retried_requests`); if the call fails anyway (every engine dead), `retry` restores the dead engines
  and runs it again — the rollout from the same data position, so the same prompts with the same seeds;
- during the weight sync (`push`): the transport marks the engine dead, finishes the sync on the others and
  reports it (weights/transports.py); any other sync failure while an engine is found dead is treated the same.

`restore(dead)`, in rounds: each dead engine is retired (its own shutdown, best effort: an SGLang engine stops its
process group; off the router; killed) and a new actor started on the same bundle with the same config; the
sync is set up again over every engine and the current weights pushed and verified; only engines that took them
join the router. Engines that die on the way go to the next round. While every engine is dead, rounds go on
until `timeout_s`, then `EnginesLost` names them; with some alive, after `rounds_with_live` rounds the run goes
on without the rest (the next step's `ensure` tries again). `restarted` counts engines back in service
(`engines/restarted`).

A trainer rank's death (`TrainerRankDied`) is never taken for an engine's: it stops the run.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ray

from glm_rl.trainer.group import TrainerRankDied
from glm_rl.weights.liveness import probe_dead

if TYPE_CHECKING:
    from glm_rl.runtime import Runtime

log = logging.getLogger(__name__)


class EnginesLost(RuntimeError):
    """Every engine is dead and none came back in time."""


class EngineRecovery:
    def __init__(
        self, rt: Runtime, timeout_s: float = 600.0, rounds_with_live: int = 2, start_timeout_s: float = 600.0
    ) -> None:
        self.rt, self.timeout_s, self.rounds_with_live = rt, timeout_s, rounds_with_live
        self.start_timeout_s = start_timeout_s
        self.restarted = 0  # engines back in service, over the run
        self.redone = 0  # rollout / eval calls run again after a restore, over the run

    def dead(self) -> list[int]:
        """Engines (indices) that do not answer /health."""
        return probe_dead(dict(enumerate(self.rt.engine_urls)))

    def ensure(self) -> int:
        """Restore every engine that does not answer now; how many came back."""
        before = self.restarted
        dead = self.dead()
        if dead:
            self.restore(dead)
        return self.restarted - before

    def retry(
        self, call: Callable[[], Any], what: str, before_again: Callable[[], Any] | None = None, attempts: int = 3
    ) -> Any:
        """`call()`; when it fails while engines are dead, restore them, run `before_again()` and call again."""
        for attempt in range(attempts):
            try:
                return call()
            except (ray.exceptions.RayTaskError, RuntimeError) as e:
                if isinstance(e, (TrainerRankDied, EnginesLost)):
                    raise
                dead = self.dead()
                if not dead or attempt == attempts - 1:
                    raise
                log.warning(
                    "%s failed with engines %s dead (%s): restoring them and running it again",
                    what,
                    self._names(dead),
                    _line(e),
                )
                self.restore(dead)
                if before_again is not None:
                    before_again()
                self.redone += 1

    def push(self, version: int) -> dict:
        """Push the trainer's weights (`version`) to every engine; engines that die meanwhile are restored and
        given them. The last push's result."""
        try:
            result = self.rt.trainers.push_weights(version)
        except TrainerRankDied:
            raise
        except Exception as e:  # noqa: BLE001 - raised again below unless an engine is dead
            dead = self.dead()
            if not dead:
                raise
            log.warning("weight sync v%d failed with engines %s dead (%s)", version, self._names(dead), _line(e))
            result = {"dead": dead}
        return self.restore(result["dead"]) if result.get("dead") else result

    def restore(self, dead: list[int]) -> dict:
        """Restart `dead` engines and give them the current weights (module docstring); the last push's result."""
        self.rt.trainers.check_alive()  # a lost node takes trainer ranks too: stop, do not wait on its engines
        n, deadline = len(self.rt.engine_urls), time.monotonic() + self.timeout_s
        pending, rounds, result = sorted(set(dead)), 0, {}
        while pending:
            rounds += 1
            log.warning("engines %s dead: restarting them (round %d)", self._names(pending), rounds)
            started = [i for i in pending if self._restart(i)]
            result = self._give_weights()
            now_dead = set(result["dead"])
            for i in sorted(now_dead - set(pending)):  # died meanwhile: out of the router too
                self._retire(i)
            for i in started:
                if i not in now_dead:
                    now_dead |= self._serve(i)
            pending = sorted(now_dead)
            if not pending:
                break
            if len(pending) == n and time.monotonic() > deadline:
                raise EnginesLost(
                    f"every engine is dead and none came back within {self.timeout_s:.0f} s: {self._names(pending)}"
                )
            if len(pending) < n and rounds >= self.rounds_with_live:
                log.warning(
                    "going on without engines %s after %d restart rounds; the next step tries again",
                    self._names(pending),
                    rounds,
                )
                break
            time.sleep(1.0)
        return result

    def _give_weights(self) -> dict:
        """Set the sync up over every engine and push the current weights; the result ("dead": who failed)."""
        rt = self.rt
        try:
            rt.trainers.setup_sync(rt.cfg.sync, rt.engine_urls, rt.api_key)
            result = rt.trainers.push_weights(rt.weight_version)
        except TrainerRankDied:
            raise
        except Exception as e:  # noqa: BLE001 - raised again unless an engine is dead
            dead = self.dead()
            if not dead:
                raise
            log.warning("giving weights to restarted engines failed (%s); dead: %s", _line(e), self._names(dead))
            return {"verified": False, "bytes": 0, "tensors": 0, "dead": dead}
        return {**result, "dead": list(result.get("dead", []))}

    def _serve(self, i: int) -> set[int]:
        """Add engine i (holding the current weights) to the router; {i} when that failed (next round)."""
        try:
            self.rt.router.add_worker(self.rt.engine_urls[i])
        except Exception as e:  # noqa: BLE001 - e.g. it died just now
            log.warning("adding engine %d to the router failed: %s", i, _line(e))
            return {i}
        self.restarted += 1
        return set()

    def _restart(self, i: int) -> bool:
        """Retire engine i and start a new one on its bundle (same config); False when that fails."""
        rt = self.rt
        self._retire(i)
        try:
            rt.engines[i] = rt.launcher.launch(rt.placement, rt.placement.engine_bundles[i], rt.share)
            rt.engine_urls[i] = ray.get(rt.engines[i].start.remote(), timeout=self.start_timeout_s)
            return True
        except Exception as e:  # noqa: BLE001 - the next round tries again
            log.warning("restarting engine %d failed: %s", i, _line(e))
            with contextlib.suppress(Exception):
                ray.kill(rt.engines[i])
            return False

    def _retire(self, i: int) -> None:
        """Stop engine i for good, each part best effort: its own shutdown, off the router, the actor killed."""
        rt = self.rt
        with contextlib.suppress(Exception):
            ray.get(rt.engines[i].shutdown.remote(), timeout=5)
        with contextlib.suppress(Exception):
            rt.router.remove_worker(rt.engine_urls[i], timeout_s=10)
        with contextlib.suppress(Exception):
            ray.kill(rt.engines[i])

    def _names(self, indices: list[int]) -> str:
        return ", ".join(f"{i} ({self.rt.engine_urls[i]})" for i in indices)


def _line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]
