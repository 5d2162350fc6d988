"""The fully-async rollout (--fully-async): groups generated continuously into a buffer the trainer takes from.

    producer: launch groups while in flight + buffered < (K + 1) x B      (B = --rollout-batch-size groups,
              a finished group goes to the buffer (or is filtered out)     K = --max-weight-staleness)
    take(v):  the first B buffered groups whose every token is at most K versions older than v; older ones are
              dropped and their prompts generated again (counted)

The launch bound keeps staleness near K by construction (a group launched while the engines hold version u is
trained at version <= u + K when groups are consumed in launch order); the check at `take` makes it exact. A group
whose requests fail on every attempt (its engines died: `RequestFailed`) gives its prompt back and is counted; any
other error (a reward or hook bug) is raised from `take`. Every prompt taken from the stream is in exactly one
place — in flight, buffered, given back or trained — so `untrained()` is what a checkpoint must replay.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from glm_rl.rollout.generation import RequestFailed
from glm_rl.rollout.samples import Sample

Group = list[Sample]


@dataclass
class AsyncStats:
    """Counts since the last `take` (reset by it)."""

    launched: int = 0  # groups launched
    stale_dropped: int = 0  # groups dropped at take: a token older than K versions
    failed: int = 0  # groups whose requests failed on every attempt (prompt given back)
    filtered: int = 0  # groups the dynamic-sampling filter dropped
    engine_idle_s: float = 0.0  # time with nothing in flight (bound reached)
    trainer_wait_s: float = 0.0  # time `take` waited for the buffer


@dataclass
class AsyncProducer:
    batch_groups: int  # B
    max_staleness: int  # K
    next_prompt: Callable[[], tuple[int, Any]]  # (row index, prompt) from the stream
    give_back: Callable[[int], None]  # a row index back to the stream (taken again first)
    run_group: Callable[[int, Any], Awaitable[Group]]  # (launch index, prompt) -> rewarded samples
    keep: Callable[[Group], bool] | None = None  # dynamic-sampling filter
    max_failed: int = 1000  # consecutive failed groups before giving up (engines gone for good)
    stats: AsyncStats = field(default_factory=AsyncStats)
    _in_flight: dict[asyncio.Task, int] = field(default_factory=dict)  # task -> row index
    _buffer: list[tuple[int, Group]] = field(default_factory=list)  # (row index, group), in finishing order
    _launches: int = 0
    _consecutive_failures: int = 0
    _error: BaseException | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _idle_since: float | None = None
    _task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._produce())

    async def stop(self) -> None:
        """Cancel everything in flight; its prompts are given back (a resume replays them)."""
        rows, tasks = list(self._in_flight.values()), [*self._in_flight, *([self._task] if self._task else [])]
        self._in_flight.clear()  # their done callbacks now find nothing to account
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for row in rows:
            self.give_back(row)
        self._task = None

    def untrained(self) -> list[int]:
        """Row indices generated or being generated but not trained (in flight, then buffered)."""
        return [*self._in_flight.values(), *(row for row, _ in self._buffer)]

    async def _produce(self) -> None:
        while True:
            while len(self._in_flight) + len(self._buffer) < (self.max_staleness + 1) * self.batch_groups:
                self._launch()
            self._idle_since = time.monotonic() if not self._in_flight else None
            self._changed.clear()
            await self._changed.wait()

    def _launch(self) -> None:
        row, prompt = self.next_prompt()
        task = asyncio.ensure_future(self.run_group(self._launches, prompt))
        self._launches += 1
        self.stats.launched += 1
        self._in_flight[task] = row
        task.add_done_callback(self._finished)
        if self._idle_since is not None:
            self.stats.engine_idle_s += time.monotonic() - self._idle_since
            self._idle_since = None

    def _finished(self, task: asyncio.Task) -> None:
        row = self._in_flight.pop(task, None)
        if row is None or task.cancelled():
            return
        error = task.exception()
        if isinstance(error, RequestFailed):
            self.stats.failed += 1
            self._consecutive_failures += 1
            self.give_back(row)
            if self._consecutive_failures > self.max_failed:
                self._error = RuntimeError(f"{self._consecutive_failures} groups in a row failed; last: {error}")
        elif error is not None:
            self._error = error
        else:
            self._consecutive_failures = 0
            group = task.result()
            if self.keep is None or self.keep(group):
                self._buffer.append((row, group))
            else:
                self.stats.filtered += 1
        self._changed.set()

    async def take(self, trainer_version: int, timeout_s: float) -> tuple[list[Group], AsyncStats] | None:
        """B groups fresh enough for `trainer_version`, and the counts since the last take; None if they are not
        ready within `timeout_s` (the caller checks its engines and asks again)."""
        self.start()
        t0, deadline = time.monotonic(), time.monotonic() + timeout_s
        while True:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            self._drop_stale(trainer_version)
            if len(self._buffer) >= self.batch_groups:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.stats.trainer_wait_s += time.monotonic() - t0
                return None
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass
        self.stats.trainer_wait_s += time.monotonic() - t0
        taken, self._buffer = self._buffer[: self.batch_groups], self._buffer[self.batch_groups :]
        stats, self.stats = self.stats, AsyncStats()
        if self._idle_since is not None:  # idle time so far belongs to this step
            now = time.monotonic()
            stats.engine_idle_s += now - self._idle_since
            self._idle_since = now
        self._changed.set()  # room for more launches
        return [group for _, group in taken], stats

    def _drop_stale(self, trainer_version: int) -> None:
        fresh = []
        for row, group in self._buffer:
            if max(s.staleness(trainer_version) for s in group) > self.max_staleness:
                self.stats.stale_dropped += 1
                self.give_back(row)
            else:
                fresh.append((row, group))
        self._buffer = fresh
