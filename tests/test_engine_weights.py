"""Weight updates into an EmbeddedEngine running in ANOTHER process (the real colocated / distributed setups).

update_weights_from_tensor: shared-memory CPU tensors travel by name (the engine has an API key, as in a run,
so the client sends `glm_rl.tensors.v1` with shm buffers). update_weights_from_distributed: the test process is
the trainer, rank 0 of a gloo group built with the same `create_weight_group` the engine uses.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

from glm_rl.models.glm45.checkpoint import load_hf_model
from glm_rl.models.glm45.presets import TINY_CHECKPOINT
from glm_rl.ray.addresses import free_port
from glm_rl.rollout.engine_client import EngineClient, EngineError
from glm_rl.weights.group import create_weight_group
from glm_rl.weights.wire import tensor_checksum

PROMPT = [1, 2, 4, 23, 13, 10, 17, 11, 5, 23]
GREEDY = {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def client():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "glm_rl.engine",
            "--hf-checkpoint",
            str(TINY_CHECKPOINT),
            "--port",
            "0",
            "--api-key",
            "k",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY "), f"engine process did not start: {line!r}"
        yield EngineClient(line.split()[1], api_key="k", timeout=60)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def hf():
    return load_hf_model(TINY_CHECKPOINT)[0]


def _logprobs(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens[:-1]])).logits[0]
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]


def _engine_logprobs(answer) -> torch.Tensor:
    return torch.tensor([lp for lp, _, _ in answer["meta_info"]["output_token_logprobs"]])


def test_update_weights_from_tensor(client, hf):
    before = client.generate(PROMPT, GREEDY, return_logprob=True)
    state = hf.state_dict()
    gen = torch.Generator().manual_seed(0)
    new = {
        "lm_head.weight": state["lm_head.weight"] * 1.3,
        "model.layers.1.mlp.gate.e_score_correction_bias": torch.randn(8, generator=gen) * 0.5,
        "model.layers.2.mlp.experts.gate_up_proj": state["model.layers.2.mlp.experts.gate_up_proj"]
        + 0.05 * torch.randn(state["model.layers.2.mlp.experts.gate_up_proj"].shape, generator=gen),
    }
    answer = client.update_weights_from_tensor(list(new.items()), weight_version=5)
    assert answer["success"] and answer["weight_version"] == 5
    assert client.weights_checksum(list(new)) == {
        "weight_version": 5,
        "checksums": {n: tensor_checksum(t) for n, t in new.items()},
    }
    after = client.generate(PROMPT, GREEDY, return_logprob=True)
    assert after["meta_info"]["weight_version"] == 5 and client.model_info()["weight_version"] == 5
    assert (_engine_logprobs(after) - _engine_logprobs(before)).abs().max() > 1e-2
    updated = load_hf_model(TINY_CHECKPOINT)[0]
    updated.load_state_dict({**updated.state_dict(), **new})
    ref = _logprobs(updated, PROMPT + after["output_ids"])[len(PROMPT) - 1 :]
    assert (_engine_logprobs(after) - ref).abs().max() <= 1e-5
    # refused updates name the culprit and change nothing
    for bad, culprit in (
        ([("model.nope.weight", torch.zeros(2))], "model.nope.weight"),
        ([("lm_head.weight", torch.zeros(3, 3))], "lm_head.weight"),
    ):
        with pytest.raises(EngineError) as info:
            client.update_weights_from_tensor(bad, weight_version=99)
        assert info.value.status == 400 and culprit in info.value.message
    assert client.server_info()["weight_version"] == 5 and client.health()


def _in_thread(fn, *args, **kwargs):
    out: dict = {}

    def run():
        try:
            out["result"] = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised by the caller
            out["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def _join(thread, out):
    thread.join(timeout=60)
    if "error" in out:
        raise out["error"]
    return out["result"]


def test_update_weights_from_distributed_restores_the_checkpoint(client, hf):
    port = free_port()
    pending = _in_thread(client.init_weights_update_group, "127.0.0.1", port, 1, 2, "sync")
    group = create_weight_group("127.0.0.1", port, rank=0, world_size=2, group_name="sync")
    assert _join(*pending)["success"]
    assert "sync" in client.server_info()["weight_groups"]

    named = list(hf.state_dict().items())  # the original checkpoint, every tensor incl. router biases
    pending = _in_thread(
        client.update_weights_from_distributed,
        [n for n, _ in named],
        [str(t.dtype) for _, t in named],
        [list(t.shape) for _, t in named],
        "sync",
        weight_version=6,
    )
    for _, tensor in named:
        group.broadcast(tensor.contiguous())
    answer = _join(*pending)
    assert answer["success"] and answer["weight_version"] == 6
    sums = client.weights_checksum()
    assert sums["weight_version"] == 6 and sums["checksums"] == {n: tensor_checksum(t) for n, t in named}

    out = client.generate(PROMPT, GREEDY, return_logprob=True)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[
            0, len(PROMPT) :
        ].tolist()
    assert out["output_ids"] == ref and out["meta_info"]["weight_version"] == 6

    # an unknown name: the engine still receives the broadcast (the trainer never hangs), then answers 400
    pending = _in_thread(client.update_weights_from_distributed, ["bogus.weight"], ["float32"], [[2]], "sync")
    group.broadcast(torch.ones(2))
    with pytest.raises(EngineError) as info:
        _join(*pending)
    assert info.value.status == 400 and "bogus.weight" in info.value.message
    assert client.destroy_weights_update_group("sync")["success"]
    with pytest.raises(EngineError):
        client.destroy_weights_update_group("sync")


def test_weight_group_backends_are_checked_before_any_join(client):
    """NCCL weight groups (GPU engines on GPUs of their own): a CPU engine refuses them with a 400 that says
    why, an unknown backend is named, and nothing is left behind (the NCCL path itself needs two GPUs:
    tests/test_gpu.py)."""
    with pytest.raises(EngineError) as info:
        client.init_weights_update_group("127.0.0.1", free_port(), 1, 2, "nccl_group", backend="nccl")
    assert info.value.status == 400 and "nccl" in info.value.message and "GPU" in info.value.message
    with pytest.raises(EngineError) as info:
        client.init_weights_update_group("127.0.0.1", free_port(), 1, 2, "mpi_group", backend="mpi")
    assert info.value.status == 400 and "'mpi'" in info.value.message and "gloo" in info.value.message
    assert not {"nccl_group", "mpi_group"} & set(client.server_info()["weight_groups"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="nccl.*CUDA"):
            create_weight_group("127.0.0.1", free_port(), rank=0, world_size=2, group_name="g", backend="nccl")
    with pytest.raises(ValueError, match="'mpi' unsupported; valid: gloo, nccl"):
        create_weight_group("127.0.0.1", free_port(), rank=0, world_size=2, group_name="g", backend="mpi")
