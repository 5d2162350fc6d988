"""`glm-rl train` across two "hosts" (network namespaces with private loopbacks, tests/netns.py): the driver
runs on the head's namespace and joins the two-node Ray cluster with `--ray-address`; `--placement-strategy
SPREAD` puts trainer rank 1 and engine 1 on the worker node. Every address a process advertises must be one
the other node can reach — a loopback address anywhere fails these runs exactly as on two real hosts.

Runs: the torch backend (DP 2) with the broadcast and the p2p (Mooncake TCP) transports, the megatron backend
with TP 2 across the nodes; and a node fault: the worker node killed mid-run stops the run with an error naming
what was lost, within a bounded time, with the last checkpoint loadable.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

SHORT = ["--rollout-batch-size", "4", "--n-samples-per-prompt", "4", "--no-report", "--placement-strategy", "SPREAD"]


def train(cluster, out, *extra, steps=3, timeout=400):
    cmd = [
        sys.executable,
        "-m",
        "glm_rl.cli",
        "train",
        "--ray-address",
        cluster.head_address,
        "--output-dir",
        str(out),
        "--num-rollout",
        str(steps),
        *SHORT,
        *extra,
    ]
    proc = cluster.exec_in(0, cmd, timeout=timeout)
    return proc


def read_run(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "placement.json").read_text())


def assert_spans_both_nodes(cluster, placement):
    hosts = {url.split("//")[1].rsplit(":", 1)[0] for url in placement["engines"]}
    assert hosts == set(cluster.ips), placement  # one engine per node
    assert set(placement["trainer_ranks"]) == set(cluster.ips), placement  # one trainer rank per node
    assert placement["driver"] == cluster.ips[0] and cluster.ips[0] in placement["router"]


@pytest.mark.parametrize("mode", ["broadcast", "p2p"])
def test_torch_backend_two_nodes(two_node_cluster, tmp_path, mode):
    out = tmp_path / mode
    proc = train(two_node_cluster, out, "--update-weight-transfer-mode", mode)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows, placement = read_run(out)
    assert_spans_both_nodes(two_node_cluster, placement)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["sync/verified"] == 1.0  # bitwise, every tensor, every step, across nodes
        assert r["routing/replay_agreement"] == 1.0
        assert r["train/num_samples"] == 16
    assert rows[0]["mismatch/logprob_abs_diff_max"] <= 1e-5  # fp32: trainer on one node == engine on the other


def test_megatron_tp2_across_nodes(two_node_cluster, tmp_path):
    out = tmp_path / "megatron"
    proc = train(
        two_node_cluster, out, "--backend", "megatron", "--tensor-model-parallel-size", "2", steps=2, timeout=500
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows, placement = read_run(out)
    assert_spans_both_nodes(two_node_cluster, placement)
    assert all(r["sync/verified"] == 1.0 for r in rows) and len(rows) == 2
    assert rows[0]["mismatch/logprob_abs_diff_max"] <= 1e-4


def test_worker_node_lost_mid_run(two_node_cluster, tmp_path):
    """The worker node dies (its Ray processes SIGKILLed) after the first checkpoint: the run stops with an
    error within a bounded time (no hang), and the checkpoint it saved stays loadable."""
    c, out = two_node_cluster, tmp_path / "fault"
    cmd = [
        sys.executable,
        "-m",
        "glm_rl.cli",
        "train",
        "--ray-address",
        c.head_address,
        "--output-dir",
        str(out),
        "--num-rollout",
        "200",
        "--save-interval",
        "1",
        *SHORT,
    ]
    proc = c.popen_in(0, cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        latest = out / "checkpoints" / "latest"
        deadline = time.time() + 240
        while not latest.is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert latest.is_file(), "no checkpoint before the fault"
        c.kill_worker()
        t0 = time.time()
        try:
            text, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the run hung after its worker node died")
        assert proc.returncode != 0, text[-3000:]
        assert time.time() - t0 < 180
    finally:
        if proc.poll() is None:
            proc.kill()
        c.start_worker()
    step = out / "checkpoints" / latest.read_text().strip()
    assert (step / "state.json").is_file()
    json.loads((step / "state.json").read_text())
