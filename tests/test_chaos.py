"""Chaos (issue 23 item 4): one run of 20 tiny steps in which a seeded helper SIGKILLs a random engine at a random
moment three times and, once, the driver itself; the run is resumed with --load and finishes.

Checked: the run finishes; every step's weight sync was verified; the data position after each step of the final
trajectory is exactly step x batch (no prompt trained twice or skipped, across engine restarts, redone rollouts
and the resume); every engine kill was survived (`engines/restarted`); and no process of either run is left
afterwards — Ray's processes and the router, recorded by pid and start time while they ran.

The seed comes from GLM_RL_CHAOS_SEED (default 0, what CI runs; other seeds by hand: GLM_RL_CHAOS_SEED=1 pytest …).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

from procwatch import ProcessWatch

STEPS, BATCH, N = 20, 4, 4
SEED = int(os.environ.get("GLM_RL_CHAOS_SEED", "0"))


def _rows(out) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _start(out, ck):
    cmd = [
        sys.executable,
        "-m",
        "glm_rl.cli",
        "train",
        "--output-dir",
        str(out),
        "--num-rollout",
        str(STEPS),
        "--rollout-batch-size",
        str(BATCH),
        "--n-samples-per-prompt",
        str(N),
        "--no-report",
        "--save",
        str(ck),
        "--load",
        str(ck),
        "--save-interval",
        "2",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, ProcessWatch(proc.pid)


def _wait(proc, until, what: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not until():
        assert proc.poll() is None, f"the run ended while waiting for {what}: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _kill_engine(rng: random.Random, proc, watch, out, killed: list) -> None:
    """After the engines killed so far are back (their restarts logged), wait for 1-3 more steps and a random
    part of a step, then SIGKILL one engine process at random."""
    restarted = lambda: sum(r.get("engines/restarted", 0) for r in _rows(out))  # noqa: E731
    _wait(proc, lambda: restarted() >= len(killed), "the previous restart")
    target = len(_rows(out)) + rng.randint(1, 3)
    _wait(proc, lambda: len(_rows(out)) >= target, f"step {target}")
    time.sleep(rng.uniform(0.0, 1.0))
    engines = watch.named("ray::EmbeddedEngine")
    assert engines, "no engine process found"
    victim = rng.choice(sorted(engines))
    os.kill(victim, signal.SIGKILL)
    killed.append(victim)


def test_chaos(tmp_path):
    rng = random.Random(SEED)
    out, ck = tmp_path / "run", tmp_path / "ck"
    t0, killed = time.monotonic(), []

    first, watch_a = _start(out, ck)
    try:
        _kill_engine(rng, first, watch_a, out, killed)
        target = rng.randint(7, 10)  # the driver, SIGKILLed mid-step after a checkpoint or two
        _wait(first, lambda: len(_rows(out)) >= target, f"step {target}")
        time.sleep(rng.uniform(0.0, 1.0))
        first.kill()
        first.wait(timeout=30)
    finally:
        watch_a.stop()
        if first.poll() is None:
            first.kill()
    routers_a = [pid for pid, c in watch_a.names.items() if "sglang" in c]
    assert watch_a.wait_all_gone(60) == []  # Ray's processes follow; the reaper stops the router
    rows_a = len(_rows(out))

    second, watch_b = _start(out, ck)  # resumes from the latest complete checkpoint
    try:
        while len(killed) < 3:
            _kill_engine(rng, second, watch_b, out, killed)
        _, err = second.communicate(timeout=300)
        assert second.returncode == 0, err[-3000:]
    finally:
        watch_b.stop()
        if second.poll() is None:
            second.kill()
    assert watch_b.wait_all_gone(30) == []
    elapsed = time.monotonic() - t0

    rows = _rows(out)
    resumed_at = rows[rows_a]["step"] - 1  # the second run's first row follows its checkpoint
    final = {r["step"]: r for r in rows[:rows_a] if r["step"] <= resumed_at} | {r["step"]: r for r in rows[rows_a:]}
    assert sorted(final) == list(range(1, STEPS + 1))
    assert all(r["sync/verified"] == 1.0 for r in rows)  # every sync of both runs, redone steps included
    n_prompts = sum(1 for _ in open(_prompt_file()))
    for step, r in final.items():  # the data position accounts for every prompt exactly once
        assert r["rollout/skipped_long_prompts"] == 0
        assert r["data/epoch"] * n_prompts + r["data/offset"] == step * BATCH, (step, r["data/epoch"], r["data/offset"])
        assert r["rollout/num_samples"] == r["train/num_samples"] == BATCH * N
    assert sum(r["engines/restarted"] for r in rows) >= 3
    assert routers_a, "the first run's router was not seen"
    print(
        f"chaos seed {SEED}: {elapsed:.0f} s, driver killed after {rows_a} rows, resumed at step {resumed_at}, "
        f"engine restarts {sum(r['engines/restarted'] for r in rows):.0f}, rollouts redone "
        f"{sum(r.get('rollout/redone', 0) for r in rows):.0f}, retried requests "
        f"{sum(r['rollout/retried_requests'] for r in rows):.0f}"
    )


def _prompt_file():
    from glm_rl.config.rollout import TINY_DATA

    return TINY_DATA / "train.jsonl"
