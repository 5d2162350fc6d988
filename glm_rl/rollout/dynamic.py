"""Dynamic sampling (DAPO; slime's loop): launch prompts in rounds until enough groups pass the filter.

    round 1: launch `per_round` groups (--over-sampling-batch-size, >= the target --rollout-batch-size)
    as groups finish: keep the ones the filter passes (all of them without a filter), count the others
    whenever kept + in flight < target: launch another round
    once `target` groups are kept: abort the surplus still in flight

Accounting (the metrics and the e2e test rely on it): launched = target + filtered + surplus, where surplus is
every launched group neither kept nor filtered out (still in flight at the end, or finished after the target
was reached). Kept groups come back in launch order, so a run without a filter keeps exactly its launches.
A filter that rejects almost everything would loop forever: after `max_filtered_per_target` x target groups
filtered out without reaching the target, `collect` raises, naming the counts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from glm_rl.rollout.samples import Sample

Group = list[Sample]


@dataclass
class CollectStats:
    launched: int = 0  # groups launched
    rounds: int = 0  # sampling rounds
    filtered: int = 0  # groups the filter dropped
    surplus: int = 0  # groups launched but neither kept nor filtered (aborted, or finished too late)


@dataclass
class Collector:
    target: int  # groups to keep
    per_round: int  # groups launched per round
    next_prompts: Callable[[int], list[Any]]  # k prompts (anything run_group takes)
    run_group: Callable[[int, Any], Awaitable[Group]]  # (launch index, prompt) -> rewarded samples
    keep: Callable[[Group], bool] | None = None  # the filter (None keeps every group)
    max_filtered_per_target: int = 50

    async def collect(self, abort: Callable[[list[asyncio.Task]], Awaitable[None]]) -> tuple[list[Group], CollectStats]:
        """Kept groups in launch order, and the counts; `abort(tasks)` ends the surplus still in flight."""
        stats, pending, kept = CollectStats(), {}, []
        try:
            while len(kept) < self.target:
                if len(kept) + len(pending) < self.target:
                    self._launch(stats, pending)
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=pending.get):
                    launch = pending.pop(task)
                    if len(kept) >= self.target:  # finished too late: not needed, whatever its outcome
                        stats.surplus += 1
                        _ = task.cancelled() or task.exception()
                        continue
                    group = task.result()  # a failed group fails the step (errors name the sample)
                    if self.keep is None or self.keep(group):
                        kept.append((launch, group))
                    else:
                        stats.filtered += 1
                self._check_progress(stats, len(kept))
        except BaseException:
            for task in pending:
                task.cancel()
            raise
        if pending:
            stats.surplus += len(pending)
            await abort(list(pending))
        return [group for _, group in sorted(kept, key=lambda kg: kg[0])], stats

    def _launch(self, stats: CollectStats, pending: dict[asyncio.Task, int]) -> None:
        for prompt in self.next_prompts(self.per_round):
            pending[asyncio.ensure_future(self.run_group(stats.launched, prompt))] = stats.launched
            stats.launched += 1
        stats.rounds += 1

    def _check_progress(self, stats: CollectStats, kept: int) -> None:
        if stats.filtered >= self.max_filtered_per_target * self.target:
            raise RuntimeError(
                f"dynamic sampling: {stats.filtered} groups filtered out over {stats.rounds} rounds "
                f"and only {kept} of {self.target} kept; the filter rejects nearly every group"
            )
