"""Run untrusted tool code in a subprocess: wall-clock timeout, memory rlimit, no network, capped output.

- timeout: the whole process group is SIGKILLed when `timeout_s` passes (children included: the child starts a
  new session).
- memory: RLIMIT_AS (address space) of `memory_mb`, RLIMIT_CORE 0, RLIMIT_FSIZE capped at the output cap (a
  tool cannot fill the disk either).
- network: the command runs under `unshare -n` (a fresh network namespace: no interface but a down loopback),
  or `unshare -rn` (also a user namespace) where plain `unshare -n` is not permitted. Where neither works the
  command runs with the host's network and a warning is logged once (`network_isolation()` says which).
- output: stdout and stderr, merged, are read up to `max_output_bytes`; a process that writes more is killed
  and the result says the output was cut.

Every outcome is a `SandboxResult`; `observation()` turns it into the text the model sees. Nothing raises for
what the tool does (hang, crash, flood, network attempt).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0
    memory_mb: int = 512
    max_output_bytes: int = 4096


@dataclass(frozen=True)
class SandboxResult:
    output: str  # stdout + stderr, decoded (invalid UTF-8 replaced), at most the cap
    returncode: int | None  # None: killed by the sandbox (timeout or output cap)
    timed_out: bool
    truncated: bool

    def observation(self, limits: SandboxLimits) -> str:
        parts = [self.output.rstrip("\n")] if self.output.strip() else []
        if self.truncated:
            parts.append(f"[output cut at {limits.max_output_bytes} bytes]")
        if self.timed_out:
            parts.append(f"error: timed out after {limits.timeout_s:g} s")
        elif self.returncode not in (0, None):
            parts.append(f"error: exit code {self.returncode}")
        return "\n".join(parts) if parts else "(no output)"


@functools.lru_cache(maxsize=1)
def network_isolation() -> list[str]:
    """The argv prefix that puts a command into a fresh network namespace ([] when none works here)."""
    unshare = shutil.which("unshare")
    for prefix in ([unshare, "-n"], [unshare, "-rn"]) if unshare else ():
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            continue
    log.warning(
        "tool sandbox: no network namespace available (unshare -n / -rn failed); sandboxed tools keep "
        "the host's network"
    )
    return []


def _limit(limits: SandboxLimits):
    def apply() -> None:  # runs in the child between fork and exec
        mem = limits.memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        cap = max(limits.max_output_bytes, 1 << 20)
        resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))

    return apply


def _kill(proc: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def _read_capped(stream: asyncio.StreamReader, cap: int, data: bytearray) -> bool:
    """Read into `data` until EOF (False) or past `cap` bytes (True: cut)."""
    while len(data) <= cap:
        chunk = await stream.read(65536)
        if not chunk:
            return False
        data += chunk
    return True


async def run_sandboxed(
    argv: list[str], limits: SandboxLimits, *, stdin: bytes = b"", isolate_network: bool = True
) -> SandboxResult:
    """Run argv under the limits; the result of whatever happened."""
    prefix = network_isolation() if isolate_network else []
    proc = await asyncio.create_subprocess_exec(
        *prefix,
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_limit(limits),
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONIOENCODING": "utf-8"},
    )
    try:
        proc.stdin.write(stdin)
        await proc.stdin.drain()
        proc.stdin.close()
    except (BrokenPipeError, ConnectionResetError):
        pass
    timed_out = truncated = False
    data = bytearray()
    deadline = asyncio.get_running_loop().time() + limits.timeout_s
    try:
        truncated = await asyncio.wait_for(_read_capped(proc.stdout, limits.max_output_bytes, data), limits.timeout_s)
        if not truncated:  # output closed; the process may still run (it closed stdout, or forked)
            await asyncio.wait_for(proc.wait(), max(deadline - asyncio.get_running_loop().time(), 0.01))
    except TimeoutError:
        timed_out = True
    if timed_out or truncated:
        _kill(proc)
        # asyncio's wait() returns only once stdout reaches EOF, and a reader paused by flow control (we stopped
        # reading at the cap) never sees it: read the rest away, then wait, both bounded
        try:
            await asyncio.wait_for(_read_capped(proc.stdout, 1 << 62, bytearray()), 5.0)
        except TimeoutError:
            pass
    try:
        returncode = await asyncio.wait_for(proc.wait(), 5.0)
    except TimeoutError:  # a grandchild outside the process group still holds the pipe
        returncode = None
    text = bytes(data[: limits.max_output_bytes]).decode("utf-8", errors="replace")
    return SandboxResult(text, None if (timed_out or truncated) else returncode, timed_out, truncated)


async def run_python(code: str, limits: SandboxLimits) -> SandboxResult:
    """`code` run by this Python in isolated mode (-I: no user site, no PYTHON* env vars), read from stdin."""
    return await run_sandboxed([sys.executable, "-I", "-"], limits, stdin=code.encode())
