"""P2P weight sync with real Mooncake (TCP on loopback), real embedded engines and real gloo groups.

Two source "ranks" are two threads of this process, each with its own gloo group handle and Mooncake
TransferEngine (what two trainer processes would hold); the dead-engine test kills an engine PROCESS.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

from glm_rl.engine import EmbeddedEngine, EngineConfig
from glm_rl.models.glm45.checkpoint import load_hf_model
from glm_rl.models.glm45.presets import TINY_CHECKPOINT
from glm_rl.ray.addresses import free_port
from glm_rl.rollout.engine_client import EngineClient
from glm_rl.weights.group import create_weight_group
from glm_rl.weights.p2p import P2PTransport
from glm_rl.weights.wire import tensor_checksum


@pytest.fixture(scope="module")
def engines():
    started = [EmbeddedEngine(EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT))) for _ in range(2)]
    urls = [e.start() for e in started]
    yield urls
    for e in started:
        e.shutdown()


def _weights(seed: int) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    state = load_hf_model(TINY_CHECKPOINT)[0].state_dict()
    return [(n, t + 0.01 * torch.randn(t.shape, generator=gen)) for n, t in state.items()]


def _run_ranks(fn, world: int) -> list:
    """fn(rank, pg) on `world` threads joined in one gloo group; re-raises the first error."""
    port, out = free_port(), [None] * world

    def run(rank: int) -> None:
        try:
            group = create_weight_group(
                "127.0.0.1", port, rank=rank, world_size=world, group_name="trainers", timeout_s=60
            )
            out[rank] = fn(rank, group.pg)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            out[rank] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return out


def test_two_sources_into_two_engines_bitwise_over_two_syncs(engines):
    syncs = [(3, _weights(1)), (4, _weights(2))]

    def rank_main(rank: int, pg) -> list[dict]:
        t = P2PTransport(engines, None, bucket_bytes=16 << 10, rank=rank, world_size=2, pg=pg, timeout_s=30)
        try:
            t.prepare()
            results = [t.push(named, version, verify=True) for version, named in syncs]
            return [*results, t.plan.bytes_per_source()]
        finally:
            t.close()

    r0, r1 = _run_ranks(rank_main, 2)
    assert [r["verified"] for r in r0[:2]] == [True, True]  # rank 0 compared every tensor of each sync
    loads = r0[2]
    total = 2 * sum(t.numel() * 4 for _, t in syncs[0][1])  # every byte once into each of 2 engines
    assert sum(loads.values()) == total and min(loads.values()) > 0
    assert abs(loads[0] - loads[1]) <= 16 << 10  # balanced to one 16 KiB chunk
    assert [r["bytes"] for r in r1[:2]] == [loads[1]] * 2  # rank 1 really sent its share
    # independent check, straight from the engines: the last sync's tensors, bitwise, at version 4
    expected = {n: tensor_checksum(t) for n, t in syncs[1][1]}
    for url in engines:
        assert EngineClient(url).weights_checksum() == {"weight_version": 4, "checksums": expected}


def test_dead_engine_is_reported_within_the_timeout():
    proc = subprocess.Popen(
        [sys.executable, "-m", "glm_rl.engine", "--hf-checkpoint", str(TINY_CHECKPOINT), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY "), line
        url = line.split()[1]
        t = P2PTransport([url], None, bucket_bytes=64 << 10, timeout_s=10)
        t.prepare()
        assert t.push(_weights(3), 1, verify=True)["verified"]
        proc.kill()
        proc.wait(timeout=30)
        start = time.time()
        result = t.push(_weights(4), 2, verify=True)  # Mooncake's -1 at once; /health then finds it dead
        assert result["dead"] == [0] and not result["verified"]  # reported, for the runtime to restart it
        assert time.time() - start < 10
        t.close()
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_engine_refuses_a_bad_layout_by_name(engines):
    client = EngineClient(engines[0])
    piece = {
        "name": "lm_head.weight",
        "dtype": "float32",
        "shape": [32, 96],
        "box": [[0, 32], [0, 96]],
        "offset": 0,
        "nbytes": 32 * 96 * 4,
    }
    for bad, culprit in (
        ({**piece, "shape": [96, 32]}, "does not match"),
        ({**piece, "name": "nope"}, "'nope'"),
        ({**piece, "box": [[0, 16], [0, 96]], "nbytes": 16 * 96 * 4}, "pieces cover"),
    ):
        with pytest.raises(Exception, match=culprit):
            client.post("/p2p/prepare", {"tensors": [bad], "buffer_bytes": 32 * 96 * 4})
