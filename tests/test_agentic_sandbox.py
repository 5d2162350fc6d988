"""Tool sandbox: a tool that hangs, crashes, prints 10 MB, eats memory or tries the network becomes an observation,
and the episode goes on (the `python` tool through `call_tool`, as the tool loop runs it)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from glm_rl.rollout.agentic.glm45_format import ToolCall
from glm_rl.rollout.agentic.sandbox import SandboxLimits, network_isolation
from glm_rl.rollout.agentic.tools import TOOLS, call_tool

LIMITS = SandboxLimits(timeout_s=2.0, memory_mb=256, max_output_bytes=1000)


def run(code: str, limits: SandboxLimits = LIMITS) -> str:
    return asyncio.run(call_tool({t.name: t for t in TOOLS}, ToolCall("python", {"code": code}), limits))


def test_output_comes_back():
    assert run("print(6*7)") == "42"


def test_hang_times_out():
    t0 = time.monotonic()
    out = run("import time\nprint('start', flush=True)\ntime.sleep(60)")
    assert time.monotonic() - t0 < 10
    assert out == "start\nerror: timed out after 2 s"


def test_child_that_closes_stdout_and_hangs_is_killed():
    t0 = time.monotonic()
    out = run("import os, time\nos.close(1)\nos.close(2)\ntime.sleep(60)")
    assert time.monotonic() - t0 < 10 and out.endswith("error: timed out after 2 s")


def test_crash_reports_exit_code():
    out = run("raise SystemExit(3)")
    assert out == "error: exit code 3"
    out = run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert out == "error: exit code -11"
    assert "ZeroDivisionError" in run("1/0") and run("1/0").endswith("error: exit code 1")


def test_ten_megabytes_of_output_are_cut():
    t0 = time.monotonic()
    out = run("import sys\nsys.stdout.write('x' * (10 << 20))")
    assert time.monotonic() - t0 < 10
    assert out == "x" * 1000 + "\n[output cut at 1000 bytes]"


def test_output_cap_with_a_writer_still_running_does_not_hang():
    """Regression: a reader paused by flow control (the cap reached, a full pipe behind it) never saw EOF after the
    kill, so asyncio's wait() hung forever (seen on a loaded 2-core box)."""
    t0 = time.monotonic()
    code = "import sys, time\nfor _ in range(64):\n    sys.stdout.write('y' * (1 << 16))\nsys.stdout.flush()\n"
    out = run(code + "time.sleep(60)")
    assert time.monotonic() - t0 < 15
    assert out == "y" * 1000 + "\n[output cut at 1000 bytes]"


def test_memory_limit():
    out = run("b = bytearray(1 << 30)\nprint('allocated')")
    assert "MemoryError" in out and "allocated" not in out


def test_network_is_unreachable():
    if not network_isolation():
        pytest.skip("no network namespace on this machine (unshare -n and -rn both fail)")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    out = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')")
    server.close()
    assert "connected" not in out and "error: exit code 1" in out
    assert "Network is unreachable" in out or "Connection refused" in out or "timed out" in out, out
    assert not accepted


def test_episode_continues_after_a_bad_tool():
    """Several bad tool calls in a row: each an observation, none an exception."""
    outs = [run(code) for code in ("while True: pass", "print('ok')")]
    assert outs[0].endswith("timed out after 2 s") and outs[1] == "ok"
