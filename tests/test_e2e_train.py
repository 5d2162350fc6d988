"""End to end on CPU: `glm-rl train` with real Ray actors, 2 embedded engines behind the real sglang-router,
2 gloo trainer ranks, broadcast weight sync, GSPO + TIS + R3 (the README demo, shortened)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from procwatch import ProcessWatch

from glm_rl.checkpoint import find_checkpoint, verify

SHORT = ["--num-rollout", "3", "--rollout-batch-size", "4", "--n-samples-per-prompt", "4", "--no-report"]


def run_train(out, *extra):
    cmd = [sys.executable, "-m", "glm_rl.cli", "train", "--output-dir", str(out), *SHORT, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, run_train(out, "--save-interval", "2")  # step 2's checkpoint: the resume test starts from it


def test_engine_and_trainer_agree_and_sync_verifies(default_run):
    _, rows = default_run
    assert [r["step"] for r in rows] == [1, 2, 3]
    first = rows[0]
    assert first["train/ppo_kl"] == pytest.approx(0.0, abs=1e-7)  # fp32: same weights, same numbers
    assert first["mismatch/logprob_abs_diff_max"] <= 1e-5
    for r in rows:
        assert r["routing/replay_agreement"] == 1.0  # R3: engine's top-k == trainer's
        assert r["sync/verified"] == 1.0  # every tensor, bitwise, every sync
        assert r["train/num_samples"] == r["rollout/num_samples"] == 16  # nothing lost or duplicated
        for key in (
            "rollout/reward_mean",
            "train/pg_clipfrac",
            "train/grad_norm",
            "correction/tis_weight_mean",
            "correction/tis_clipfrac",
            "mismatch/k3_kl",
            "perf/step_s",
            "perf/rollout_s",
            "perf/logprob_s",
            "perf/train_s",
            "perf/sync_s",
            "rollout/response_len_mean",
        ):
            assert key in r, key
        # the engines' own time (issue 25: in-loop decode rate; what the rollout spends outside the engines)
        assert 0 < r["rollout/engine_latency_max_s"] < r["perf/rollout_s"]
        assert r["perf/rollout_outside_engines_s"] == pytest.approx(
            r["perf/rollout_s"] - r["rollout/engine_latency_max_s"]
        )
        assert r["rollout/engine_decode_tok_s"] > 0


def test_writes_checkpoint_and_config(default_run):
    out, _ = default_run
    assert (out / "config.json").is_file()
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert (out / "checkpoints" / latest / "state.json").is_file()


def test_resume_continues_like_uninterrupted_run(tmp_path, default_run):
    """Resume the default run's step-2 checkpoint with --load for the 3rd step: it equals the uninterrupted run's
    step 3 (rollout, loss and gradient)."""
    run_dir, full = default_run
    ck = tmp_path / "ck"
    shutil.copytree(run_dir / "checkpoints" / "step_000002", ck / "step_000002")
    (ck / "latest").write_text("step_000002\n")
    out = tmp_path / "resumed"
    rows = run_train(out, "--load", str(ck), "--save", str(ck))
    assert [r["step"] for r in rows] == [3]
    for key in ("rollout/reward_mean", "rollout/response_len_mean", "train/pg_loss", "train/grad_norm"):
        assert rows[0][key] == pytest.approx(full[2][key], rel=1e-4, abs=1e-6), key


def test_bad_input_fails_before_start(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1", "label": 2}\n{"prompt": 5}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "glm_rl.cli", "train", "--prompt-data", str(bad), "--output-dir", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "bad.jsonl:2: missing field 'label'" in proc.stdout.replace("\n", "")
    assert not (tmp_path / "o").exists()  # nothing started, nothing written


def test_colocated_tensor_sync_with_grpo_mis_and_r2(tmp_path):
    """The other paths in one run: colocated placement, shared-memory weight sync, GRPO, MIS, R2."""
    rows = run_train(
        tmp_path / "colo",
        "--colocate",
        "--update-weight-transfer-mode",
        "tensor",
        "--advantage-estimator",
        "grpo",
        "--enable-mis",
        "--use-routing-replay",
        "--no-use-rollout-routing-replay",
        "--global-batch-size",
        "8",
    )
    for r in rows:
        assert r["sync/verified"] == 1.0
        assert r["train/optimizer_steps"] == 2.0
        assert r["correction/mis_masked_frac"] == 0.0  # fp32: engine == trainer, nothing rejected
        assert "routing/replay_agreement" not in r  # R2 replays the trainer's own routing
        assert 0.5 < r["routing/train_replay_agreement"] <= 1.0
    assert rows[0]["train/ppo_kl"] != 0.0  # the 2nd optimizer step of a rollout sees updated weights


def test_p2p_weight_sync_verifies_every_step(tmp_path):
    """--update-weight-transfer-mode p2p: both trainer ranks write their planned share into both engines through
    Mooncake (TCP, loopback); every tensor is verified bitwise after each sync."""
    rows = run_train(tmp_path / "p2p", "--update-weight-transfer-mode", "p2p")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["sync/verified"] == 1.0


def test_colocated_bf16_tensor_sync_saves_and_resumes(tmp_path):
    """Issue 20 item 1, with the flags that crashed the final save: the trainer's weights are views into one
    buffer holding bf16 and fp32 tensors. The run saves (safetensors) and a second run resumes from it."""
    from glm_rl.checkpoint import load_safetensors

    out, ck = tmp_path / "bf16", tmp_path / "ck"
    flags = ["--colocate", "--update-weight-transfer-mode", "tensor", "--dtype", "bfloat16", "--save", str(ck)]
    rows = run_train(out, *flags, "--num-rollout", "2")
    assert [r["sync/verified"] for r in rows] == [1.0, 1.0]
    step, _ = find_checkpoint(ck, num_ranks=2)
    assert step.name == "step_000002"
    dtypes = {t.dtype for t in load_safetensors(step / "rank0" / "model.safetensors").values()}
    assert torch.bfloat16 in dtypes and len(dtypes) > 1  # the mixed layout that torch.save refused
    rows = run_train(out, *flags, "--num-rollout", "3", "--load", str(ck))
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["sync/verified"] == 1.0


def _start_run(out, *extra):
    cmd = [
        sys.executable,
        "-m",
        "glm_rl.cli",
        "train",
        "--output-dir",
        str(out),
        "--rollout-batch-size",
        "4",
        "--n-samples-per-prompt",
        "4",
        "--no-report",
        "--num-rollout",
        "200",
        *extra,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_rows(proc, out, n: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"the run did not reach {n} steps: " + (proc.stderr.read()[-3000:] if proc.poll() else ""))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_run_within_seconds_leaving_nothing(tmp_path, sig):
    """SIGINT / SIGTERM mid-run: the driver exits within seconds, every checkpoint on disk is complete (none
    half-written), and no process the run started is left (checked by pid and start time)."""
    out = tmp_path / "run"
    proc = _start_run(out, "--save-interval", "1")
    watch = ProcessWatch(proc.pid)
    try:
        _wait_rows(proc, out, 3)
        t0 = time.monotonic()
        proc.send_signal(sig)
        proc.communicate(timeout=60)
        assert time.monotonic() - t0 < 20, "the run took too long to stop"
    finally:
        watch.stop()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert watch.wait_all_gone(20) == []
    ck = out / "checkpoints"
    assert not list(ck.glob(".*partial")), "a partial checkpoint was left"
    step, _ = find_checkpoint(ck, num_ranks=2)
    for d in ck.glob("step_*"):
        verify(d, num_ranks=2)  # every step directory there is complete
    assert step is not None


def test_a_dead_trainer_rank_stops_the_run_naming_it_and_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = _start_run(out, "--save-interval", "2")
    watch = ProcessWatch(proc.pid)
    try:
        _wait_rows(proc, out, 3)
        victim = watch.named("ray::TrainerActor")[-1]
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        watch.stop()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    ck = out / "checkpoints"
    latest = (ck / "latest").read_text().strip()
    said = " ".join(err.split())  # one message; Ray's own lines may follow it
    assert re.search(r"glm-rl train stopped: trainer rank [01] died", said), said[-3000:]
    assert f"The last checkpoint is {ck / latest}: resume with --load {ck}" in said
    assert watch.wait_all_gone(20) == []
