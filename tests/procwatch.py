"""Every process a run started, by pid and start time, recorded while it runs (read from /proc: the same walk
as glm_rl/reaper.py), so a test can check afterwards that none is left — never confusing a reused pid."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from glm_rl.reaper import descendants


def _start_time(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])  # a zombie is gone (only not yet reaped)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class ProcessWatch:
    """Records the descendants of `root` every `interval` seconds until `stop()`."""

    def __init__(self, root: int, interval: float = 0.3) -> None:
        self.root, self.interval, self.seen = root, interval, {}
        self.names: dict[int, str] = {}  # pid → its last command line seen (Ray renames workers as they serve)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = descendants(self.root)
            self.seen.update(now)
            self.names.update((pid, c) for pid in now if (c := cmdline(pid)))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def named(self, prefix: str) -> list[int]:
        """Recorded processes alive now whose command line starts with `prefix` (e.g. "ray::EmbeddedEngine")."""
        return [pid for pid in self.alive() if cmdline(pid).startswith(prefix)]

    def alive(self) -> list[int]:
        return [pid for pid, start in self.seen.items() if _start_time(pid) == start]

    def wait_all_gone(self, timeout_s: float) -> list[str]:
        """Wait until no recorded process is alive; the command lines of those still alive after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        return [f"{pid}: {cmdline(pid)[:120]}" for pid in self.alive()]
