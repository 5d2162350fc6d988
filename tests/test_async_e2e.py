"""The async loops run as users run them (issue 19): the tiny demo as `glm-rl train --fully-async` (its defaults:
2 engines, 16 prompts x 8, 60 steps) — with `--partial-rollout` to step 40, one engine SIGKILLed mid-run, then
resumed with --load to step 60 without it (weight pushes staged mid-generation); and `--one-step-off`, saved
every step.

Checked on the rollout dumps and checkpoints (prompts are distinct and carry their row index): the demo learns
(mean reward of the last 5 steps >= the first 5 + 0.2) within 10 minutes of wall time; no trained token is more
than --max-weight-staleness versions older than the weights it trains; every prompt taken from the stream is
trained exactly once or listed for replay in the last checkpoint — none repeated, none lost — across the kill and
the resume; one-step-off trains every batch after the first exactly one version old, and its checkpoints place the
batch generated ahead back in the stream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from procwatch import ProcessWatch

from glm_rl.config.rollout import TINY_DATA
from glm_rl.rollout.data import load_prompts
from glm_rl.rollout.debug_data import load_rollout
from glm_rl.rollout.manager import PromptStream

SEED = 1234
DEMO_BATCH, DEMO_N = 16, 8  # the demo's defaults
BATCH, N = 4, 4  # one-step-off's short run


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """The tiny task's distinct prompts (over a thousand: the demo's 60 steps stay in one epoch), each with its
    row index in metadata."""
    seen, rows = set(), []
    for line in (TINY_DATA / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append({**row, "metadata": {"row": len(rows)}})
    assert len(rows) > 60 * DEMO_BATCH + 4 * DEMO_BATCH
    path = tmp_path_factory.mktemp("async_data") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cmd(out, prompts, *flags):
    return [
        sys.executable, "-m", "glm_rl.cli", "train", "--output-dir", str(out), "--prompt-data", str(prompts),
        "--no-report", "--seed", str(SEED),
        "--save-debug-rollout-data", str(out.parent / "dumps" / "r_{rollout_id}.pt"), *flags,
    ]  # fmt: skip


def _rows(out) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _kill_an_engine_after(out, steps: int, proc, watch) -> None:
    deadline = time.monotonic() + 300
    while len(_rows(out)) < steps:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the run did not reach the kill"
        time.sleep(0.05)
    engines = watch.named("ray::EmbeddedEngine")
    assert engines, "no engine process found"
    os.kill(sorted(engines)[0], signal.SIGKILL)


@pytest.fixture(scope="module")
def fully_async(tmp_path_factory, prompts):
    """Run A (the demo to step 40 with --partial-rollout, one engine killed after step 10, saved at 20 and 40), then
    run B resumed to 60 without partial rollouts; the wall time of both."""
    out, t0 = tmp_path_factory.mktemp("fully_async") / "run", time.monotonic()
    flags = [
        "--fully-async", "--max-weight-staleness", "1", "--save-interval", "20",
        "--save", str(out.parent / "ck"), "--load", str(out.parent / "ck"),
    ]  # fmt: skip
    # run A with --partial-rollout (engines paused "abort", samples continued), run B without (pushes staged)
    first = subprocess.Popen(
        _cmd(out, prompts, *flags, "--partial-rollout", "--num-rollout", "40"), stderr=subprocess.PIPE, text=True
    )
    watch = ProcessWatch(first.pid)
    try:
        _kill_an_engine_after(out, 10, first, watch)
        _, err = first.communicate(timeout=600)
    finally:
        watch.stop()
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    rows_a = len(_rows(out))
    second = subprocess.run(
        _cmd(out, prompts, *flags, "--num-rollout", "60"), capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stderr[-3000:]
    return out, rows_a, time.monotonic() - t0


def _trained_rows(out, steps: int, batch: int, n: int) -> list[list[int]]:
    """Per step, the prompt rows its batch trained (one per group)."""
    per_step = []
    for step in range(steps):
        samples, _ = load_rollout(out.parent / "dumps" / f"r_{step}.pt", step)
        per_step.append(sorted({s.metadata["row"] for s in samples}))
        assert len(samples) == batch * n and len(per_step[-1]) == batch
    return per_step


def _order(prompts) -> list[int]:
    return PromptStream(load_prompts(str(prompts)), SEED, shuffle=True)._make_order()


def test_the_fully_async_demo_learns_within_ten_minutes(fully_async):
    out, _, wall = fully_async
    rewards = [r["rollout/reward_mean"] for r in _rows(out)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"fully-async demo: {len(rewards)} steps, reward {first:.3f} -> {last:.3f}, {wall:.0f} s (kill + resume)")
    assert len(rewards) == 60 and last - first >= 0.2 and wall < 600


def test_fully_async_never_trains_a_token_older_than_the_bound(fully_async):
    out, rows_a, _ = fully_async
    for step in range(60):  # the trainer holds version `step` when it trains step `step`'s batch
        samples, _ = load_rollout(out.parent / "dumps" / f"r_{step}.pt", step)
        for s in samples:
            versions = s.token_versions or [s.weight_version] * len(s.response_ids)
            assert min(versions) == s.weight_version and step - min(versions) <= 1, (step, versions)
    rows = _rows(out)
    assert all(r["rollout/staleness_max"] <= 1 and r["sync/verified"] == 1.0 for r in rows)
    assert {"async/trainer_wait_s", "async/engine_idle_s", "async/pause_s", "rollout/staleness_mean"} <= set(rows[-1])
    assert sum(r["rollout/partial_continued"] for r in rows[:rows_a]) > 0  # run A: --partial-rollout, paused abort
    assert all(r["async/pause_s"] == 0.0 for r in rows[rows_a:])  # run B: pushed mid-generation, staged


def test_fully_async_accounts_for_every_prompt_across_a_killed_engine_and_a_resume(fully_async, prompts):
    out, rows_a, _ = fully_async
    rows = _rows(out)
    assert sum(r["engines/restarted"] for r in rows[:rows_a]) >= 1  # the killed engine came back
    assert [r["step"] for r in rows[rows_a:]] == list(range(41, 61))  # run B resumed after step 40
    trained = [row for step_rows in _trained_rows(out, 60, DEMO_BATCH, DEMO_N) for row in step_rows]
    assert len(trained) == len(set(trained)) == 60 * DEMO_BATCH  # no prompt trained twice
    state = json.loads((out.parent / "ck" / "step_000060" / "state.json").read_text())["data"]
    assert state["epoch"] == 0
    replay = state["replay"]
    # every prompt the stream handed out is trained or waits for replay: none lost, none in both
    assert not set(trained) & set(replay) and len(replay) == len(set(replay))
    assert sorted(trained + replay) == sorted(_order(prompts)[: state["offset"]])
    print(
        "fully-async: partial continuations",
        sum(r.get("rollout/partial_continued", 0) for r in rows),
        "stale dropped",
        sum(r["rollout/stale_dropped"] for r in rows),
        "failed groups",
        sum(r["rollout/failed_groups"] for r in rows),
    )


def test_one_step_off_trains_one_version_behind_and_saves_the_batch_ahead(tmp_path, prompts):
    out = tmp_path / "run"
    flags = ["--one-step-off", "--num-rollout", "3", "--save-interval", "1", "--save", str(tmp_path / "ck")]
    flags += ["--rollout-batch-size", str(BATCH), "--n-samples-per-prompt", str(N)]
    proc = subprocess.run(_cmd(out, prompts, *flags), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(out)
    assert [r["rollout/staleness_max"] for r in rows] == [0.0, 1.0, 1.0]
    assert [r["rollout/staleness_mean"] for r in rows] == [0.0, 1.0, 1.0]
    for step in (1, 2):  # the batch generated ahead is not counted as trained: a resume generates it again
        state = json.loads((tmp_path / "ck" / f"step_{step:06d}" / "state.json").read_text())["data"]
        assert state["epoch"] == 0 and state["offset"] == step * BATCH and state["replay"] == []
    trained = [row for step_rows in _trained_rows(out, 3, BATCH, N) for row in step_rows]
    assert trained == [r for step in range(3) for r in sorted(_order(prompts)[step * BATCH : (step + 1) * BATCH])]
