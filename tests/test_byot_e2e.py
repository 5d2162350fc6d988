"""Bring your own task, end to end on CPU (issue 17): ONE short `glm-rl train` run carries most assertions.

The run trains the tiny model from a Parquet file with keys question / answer / metadata and chat-message prompts
(`--input-key question --label-key answer --apply-chat-template`), rewarded by a `glm-rl reward-server` process
(`--rm-type remote_rm --rm-url`), with dynamic sampling (twice the prompts launched, nonzero-std filter), eval of
the arithmetic eval set before training and every 5 steps, TensorBoard, W&B offline and rollout dumps. A second,
train-only run replays the dumps and must reproduce the first run's train metrics. Plus the embedded engine's
/abort_request.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from glm_rl.engine import EmbeddedEngine, EngineConfig
from glm_rl.models.glm45.presets import TINY_CHECKPOINT
from glm_rl.rollout.data import load_prompts
from glm_rl.rollout.debug_data import load_rollout
from glm_rl.rollout.engine_client import EngineClient
from glm_rl.rollout.rewards import get_reward_fn

ARITH = TINY_CHECKPOINT.parent / "arith"
STEPS, BATCH, N = 10, 4, 4
COMMON = [
    "--num-rollout",
    str(STEPS),
    "--rollout-batch-size",
    str(BATCH),
    "--n-samples-per-prompt",
    str(N),
    "--input-key",
    "question",
    "--label-key",
    "answer",
    "--apply-chat-template",
]


@pytest.fixture(scope="module")
def reward_server():
    """`glm-rl reward-server` serving the built-in arithmetic grader on a free port (the URL it prints)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "glm_rl.cli", "reward-server", "--rm-type", "arithmetic", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "reward server: arithmetic on http://" in line, line
        yield line.rsplit(" on ", 1)[1].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    rows = load_prompts(ARITH / "train.jsonl")[:400]
    path = tmp_path_factory.mktemp("data") / "arith.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "question": [{"role": "user", "content": r.prompt}],
                    "answer": r.label,
                    "metadata": {"source": "arith", "row": i},
                }
                for i, r in enumerate(rows)
            ]
        ),
        path,
    )
    return path


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_CHECKPOINT))


def _train(out, *flags):
    proc = subprocess.run(
        [sys.executable, "-m", "glm_rl.cli", "train", "--output-dir", str(out), *flags],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WANDB_SILENT": "true"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, proc.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory, reward_server, parquet):
    out = tmp_path_factory.mktemp("byot")
    rows, stdout = _train(
        out,
        *COMMON,
        "--prompt-data",
        str(parquet),
        "--rm-type",
        "remote_rm",
        "--rm-url",
        reward_server,
        "--over-sampling-batch-size",
        str(2 * BATCH),
        "--dynamic-sampling-filter-path",
        "check_reward_nonzero_std",
        "--eval-interval",
        "5",
        "--eval-before-train",
        "--eval-prompt-data",
        "arith",
        str(ARITH / "eval.jsonl"),
        "--eval-input-key",
        "prompt",
        "--eval-label-key",
        "label",
        "--eval-rm-type",
        "arithmetic",
        "--use-tensorboard",
        "--use-wandb",
        "--wandb-mode",
        "offline",
        "--wandb-project",
        "glm-rl-test",
        "--wandb-run-name",
        "byot",
        "--save-debug-rollout-data",
        str(out / "dumps" / "rollout_{rollout_id}.pt"),
    )
    dumps = [load_rollout(out / "dumps" / f"rollout_{s}.pt", s) for s in range(STEPS)]
    return out, rows, stdout, dumps


def _train_rows(rows):
    return [r for r in rows if "rollout/reward_mean" in r]


def test_trains_from_parquet_chat_prompts(run, parquet, tiny_tokenizer):
    _, rows, _, dumps = run
    assert [r["step"] for r in _train_rows(rows)] == list(range(1, STEPS + 1))
    table = pq.read_table(parquet).to_pylist()
    for samples, _ in dumps:
        assert len(samples) == BATCH * N
        for s in samples:
            row = table[s.metadata["row"]]  # metadata travelled with the row
            assert s.metadata == {"source": "arith", "row": s.metadata["row"]} and s.label == row["answer"]
            assert s.prompt_ids == tiny_tokenizer.apply_chat_template(
                row["question"], add_generation_prompt=True, tokenize=True, return_dict=False
            )


def test_remote_rewards_equal_the_builtin_grader(run, tiny_tokenizer):
    _, rows, _, dumps = run
    grader = get_reward_fn("arithmetic")
    for samples, _ in dumps:
        for s in samples:
            text = tiny_tokenizer.decode(s.response_ids, skip_special_tokens=True)
            assert s.reward == grader(text, s.label, s.metadata)
    assert all(r["rollout/rm_retries"] == 0 for r in _train_rows(rows))


def test_dynamic_sampling_trains_only_groups_with_reward_spread(run):
    _, rows, _, dumps = run
    for samples, _ in dumps:
        for g in range(BATCH):
            assert np.std([s.reward for s in samples[g * N : (g + 1) * N]]) > 0
    for r in _train_rows(rows):
        assert r["rollout/generated_groups"] == 2 * BATCH * r["rollout/sampling_rounds"]
        assert r["rollout/generated_groups"] == BATCH + r["rollout/filtered_groups"] + r["rollout/aborted_groups"]
        assert r["rollout/aborted_requests"] <= N * r["rollout/aborted_groups"]
        assert r["train/num_samples"] == BATCH * N
    assert sum(r["rollout/filtered_groups"] for r in rows if "rollout/filtered_groups" in r) > 0


def test_eval_before_and_every_5_steps(run):
    out, rows, stdout, _ = run
    evals = [r for r in rows if "eval/arith/pass@1" in r]
    assert [r["step"] for r in evals] == [0, 5, 10]
    for r in evals:
        assert 0 <= r["eval/arith/pass@1"] <= 1 and r["eval/arith/response_len_mean"] > 0
        assert r["eval/arith/reward_mean"] == pytest.approx(r["eval/arith/pass@1"])  # 0/1 rewards, 1 sample
    assert stdout.count("eval arith pass@1") == 3
    assert (out / "report.png").stat().st_size > 10_000


def test_tensorboard_holds_the_step_metrics(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, rows, _, _ = run
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    rewards = {e.step: e.value for e in acc.Scalars("rollout/reward_mean")}
    assert rewards == pytest.approx({r["step"]: r["rollout/reward_mean"] for r in _train_rows(rows)})
    assert [e.step for e in acc.Scalars("eval/arith/pass@1")] == [0, 5, 10]


def _wandb_history(run_file: str) -> list[dict]:
    """History rows of an offline W&B run file (a LevelDB-style log of protobuf `Record`s)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, block, chunks, records = open(run_file, "rb").read(), 7, 32768, b"", []
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        chunks, pos = chunks + raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST
            records.append(pb.Record.FromString(chunks))
            chunks = b""
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]


def test_wandb_offline_run_holds_the_step_metrics(run):
    out, rows, _, _ = run
    (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = {h["_step"]: h for h in _wandb_history(run_file)}
    assert sorted(history) == [r["step"] for r in rows]
    for r in rows:
        for key in ("rollout/reward_mean", "train/pg_loss", "eval/arith/pass@1"):
            if key in r:
                assert history[r["step"]][key] == pytest.approx(r[key]), (r["step"], key)


def test_replaying_saved_rollouts_reproduces_train_metrics(run, parquet, reward_server, tmp_path):
    """Train only (no engines) on the dumps: the same samples train to the same metrics (fp32, CPU)."""
    out, rows, _, _ = run
    replay, stdout = _train(
        tmp_path / "replay",
        *COMMON,
        "--prompt-data",
        str(parquet),
        "--rm-type",
        "remote_rm",
        "--rm-url",
        reward_server,
        "--no-report",
        "--load-debug-rollout-data",
        str(out / "dumps" / "rollout_{rollout_id}.pt"),
    )
    saved = _train_rows(rows)
    assert [r["step"] for r in replay] == [r["step"] for r in saved]
    for a, b in zip(saved, replay):
        assert "sync/verified" not in b  # no engines: nothing synced
        train_keys = [k for k in a if k.startswith(("train/", "mismatch/", "correction/", "routing/"))]
        train_keys += ["rollout/reward_mean", "rollout/num_samples"]  # saved with the samples
        assert len(train_keys) > 10
        for key in train_keys:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_embedded_engine_abort_request():
    """SGLang's /abort_request on the embedded engine: one running row by rid (its neighbour runs on), a queued
    request by rid, then everything with abort_all."""
    engine = EmbeddedEngine(EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT), max_batch_size=2))
    client = EngineClient(engine.start(), timeout=60)
    prompt = [1, 2, 4, 23, 13, 10, 17, 11, 5, 23]
    long = {"max_new_tokens": 118, "ignore_eos": True}
    try:
        out: dict = {}
        bodies = {
            "batch": {"input_ids": [prompt] * 2, "rid": ["keep", "cut"], "sampling_params": long},
            "queued": {"input_ids": prompt, "rid": "queued", "sampling_params": long},
        }
        threads = [
            threading.Thread(target=lambda k=k: out.setdefault(k, client.post("/generate", bodies[k]))) for k in bodies
        ]
        threads[0].start()
        _wait(lambda: client.get_load()[0]["num_reqs"] == 2 and client.get_load()[0]["num_waiting_reqs"] == 0)
        threads[1].start()
        _wait(lambda: client.get_load()[0]["num_waiting_reqs"] == 1)
        assert client.post("/abort_request", {"rid": "queued"})["num_aborted_queued"] == 1
        client.post("/abort_request", {"rid": "cut"})
        for t in threads:
            t.join(timeout=60)
        keep, cut = out["batch"]
        assert keep["meta_info"]["finish_reason"]["type"] == "length" and keep["meta_info"]["completion_tokens"] == 118
        assert cut["meta_info"]["finish_reason"]["type"] == "abort" and cut["meta_info"]["completion_tokens"] < 118
        assert out["queued"]["meta_info"]["finish_reason"]["type"] == "abort" and out["queued"]["output_ids"] == []
        thread = threading.Thread(
            target=lambda: out.setdefault(
                "all", client.post("/generate", {"input_ids": [prompt] * 2, "sampling_params": long})
            )
        )
        thread.start()
        _wait(lambda: client.get_load()[0]["num_reqs"] == 2)
        client.post("/abort_request", {"abort_all": True})
        thread.join(timeout=60)
        assert all(r["meta_info"]["finish_reason"]["type"] == "abort" for r in out["all"])
        assert client.generate(prompt, {"max_new_tokens": 2})["meta_info"]["completion_tokens"] >= 1
    finally:
        engine.shutdown()


def _wait(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)
