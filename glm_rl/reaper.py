"""The run's reaper: a small process that outlives its driver and stops whatever the driver left running.

Why: a driver that ends normally (or on SIGINT / SIGTERM) stops the run itself (`Runtime.shutdown`, then Ray's
own shutdown at exit). A driver killed with SIGKILL cannot: Ray's processes follow their raylet within seconds
(its agents within ~30 s), but the sglang-router runs in a session of its own and stays forever (seen), and so
would any process an engine started that way.

How: `Runtime.start` launches `python -m glm_rl.reaper <driver pid>` once per driver process, in its own session
(a Ctrl-C to the terminal does not reach it). While the driver lives, the reaper records every process that
descends from it, by pid and start time (read from /proc every `--interval` seconds). Once the driver is gone it
SIGKILLs the recorded processes that are still there (same pid and start time: never a pid reused by someone
else), then exits. Linux only (/proc); elsewhere it is not started.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

_started_for: int | None = None  # the driver pid a reaper was started for (once per process)


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of `pid`, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid ... starttime is field 22
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """Every process below `root` now: pid → start time."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                children.setdefault(st[0], []).append((int(entry), st[1]))
    found, todo = {}, [root]
    while todo:
        for pid, start in children.get(todo.pop(), []):
            if pid not in found:
                found[pid] = start
                todo.append(pid)
    return found


def watch(driver: int, interval: float) -> list[int]:
    """Record the driver's descendants until it is gone, then SIGKILL those still running; the pids killed."""
    me, seen = os.getpid(), {}
    driver_start = (_stat(driver) or (0, None))[1]
    while (st := _stat(driver)) is not None and st[1] == driver_start:
        seen.update(descendants(driver))
        seen = {pid: start for pid, start in seen.items() if (s := _stat(pid)) is not None and s[1] == start}
        time.sleep(interval)
    killed = []
    for pid, start in seen.items():
        st = _stat(pid)
        if pid != me and st is not None and st[1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
    return killed


def start_reaper(interval: float = 0.5) -> None:
    """Start this process's reaper (once; Linux only)."""
    global _started_for
    if _started_for == os.getpid() or not Path("/proc/self/stat").exists():
        return
    subprocess.Popen(
        [sys.executable, "-m", "glm_rl.reaper", str(os.getpid()), "--interval", str(interval)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _started_for = os.getpid()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m glm_rl.reaper", description=__doc__.splitlines()[0])
    parser.add_argument("driver", type=int, help="the driver's pid")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between scans")
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(args.driver, args.interval)


if __name__ == "__main__":
    main()
