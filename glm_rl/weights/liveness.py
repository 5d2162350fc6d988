"""Engines dying during a weight sync: find which died, and never let a dead one block the sync.

A transport that sees a failure asks `probe_dead` which engines stopped answering /health; those are marked dead,
the sync goes on (or is redone) without them and the push reports them, so the runtime restarts them and gives
them the current weights. A failure with every engine still answering is a real error and is raised.

Why the rest of this module: gloo may block a send to a killed peer until the group's timeout instead of failing
(seen with torch 2.13: the source's broadcast hung the full 60 s when the first receiver died, failed in 8 ms when
the second did). So the source never waits on gloo alone: `wait_work` also ends when an engine's receive call
fails, calls that may block on a dead peer run in their own daemon threads (`in_thread`, never a pool worker
that later calls would queue behind), and a group left with a stuck operation is kept (`abandon`) until that
operation's timeout has passed, because destroying it earlier blocks the caller in gloo's destructor.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any

from glm_rl.rollout.engine_client import EngineClient

HEALTH_TIMEOUT_S = 5.0
_abandoned: list[tuple[float, Any]] = []  # (when, group): groups whose stuck operation has not timed out yet
_abandoned_lock = threading.Lock()


def probe_dead(urls: dict[int, str]) -> list[int]:
    """The keys of `urls` whose engine does not answer /health within HEALTH_TIMEOUT_S (probed in parallel)."""
    if not urls:
        return []
    pool = ThreadPoolExecutor(max_workers=len(urls))
    try:
        answers = dict(zip(urls, pool.map(lambda u: EngineClient(u, timeout=HEALTH_TIMEOUT_S).health(), urls.values())))
    finally:
        pool.shutdown(wait=False)
    return sorted(i for i, ok in answers.items() if not ok)


def in_thread(fn, *args: Any, **kwargs: Any) -> Future:
    """`fn(*args, **kwargs)` in a new daemon thread; its result or exception as a Future."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the waiter
            future.set_exception(e)

    threading.Thread(target=run, daemon=True, name=f"weights-{getattr(fn, '__name__', 'call')}").start()
    return future


def first_failure(futures: list[Future]) -> list:
    """Every future's result; the first exception is raised as soon as it happens (the others are left)."""
    done, _ = wait(futures, return_when=FIRST_EXCEPTION)
    for f in done:
        if f.exception() is not None:
            raise f.exception()
    return [f.result() for f in futures]


def wait_work(work: Any, pending: list[Future]) -> None:
    """Wait for a gloo `work` (bounded by its group's timeout), ending at once when one of the engines' `pending`
    calls fails: then that call's error is raised, and the work is left to time out."""
    done = threading.Event()
    work.get_future().then(lambda _: done.set())
    for p in pending:
        p.add_done_callback(lambda f: done.set() if f.exception() is not None else None)
    done.wait()
    for p in pending:
        if p.done() and p.exception() is not None:
            raise p.exception()
    work.wait()


def abandon(group: Any, timeout_s: float) -> None:
    """Keep `group` (its operation may be stuck on a dead peer) until `timeout_s` after now, when gloo has ended
    that operation and dropping the group no longer blocks; groups abandoned long enough ago are dropped here."""
    now = time.monotonic()
    with _abandoned_lock:
        _abandoned[:] = [(t, g) for t, g in _abandoned if t > now]
        if group is not None:
            _abandoned.append((now + timeout_s + 5.0, group))
