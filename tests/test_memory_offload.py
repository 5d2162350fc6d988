"""Colocation memory (issue 20 item 2) on CPU: `HostOffload` moves storages out and back in place (reference
behaviour: identity kept, bytes back bitwise, an optimizer step after a round trip equals one without), and
`Colocation` asks the engines for SGLang's memory tags in each phase, in order.

The GPU side (memory actually returned to the driver, CUDA graphs captured again, the H100 figures) is in
tests/test_gpu.py and benchmarks/RESULTS.md."""

from __future__ import annotations

import pytest
import torch

from glm_rl.colocation import Colocation
from glm_rl.config import parse_args
from glm_rl.engine import EmbeddedEngine, EngineConfig
from glm_rl.memory import HostOffload
from glm_rl.models.glm45.presets import TINY_CHECKPOINT
from glm_rl.weights.flat import flatten_module_


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _step(model, opt, x):
    opt.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    opt.step()


def test_round_trip_keeps_identity_and_bytes_and_the_next_step():
    x = torch.randn(5, 8)
    a, opt_a = _model_and_optimizer(0)
    b, opt_b = _model_and_optimizer(0)
    flat, _ = flatten_module_(a)  # the colocated layout: parameters are views into one buffer
    _step(a, opt_a, x)
    _step(b, opt_b, x)
    state = [t for s in opt_a.state.values() for t in s.values() if t.dim() > 0]  # exp_avg, exp_avg_sq
    before = {k: v.clone() for k, v in a.state_dict().items()}
    params = list(a.parameters())
    off = HostOffload([flat, *params, *state])
    assert len(off.storages) == 1 + len(state)  # every parameter shares the flat buffer's storage
    assert off.nbytes == flat.numel() * flat.element_size() + sum(t.numel() * t.element_size() for t in state)
    off.release()
    assert flat.untyped_storage().nbytes() == 0 and all(t.untyped_storage().nbytes() == 0 for t in state)
    off.release()  # twice is once
    off.restore()
    assert list(a.parameters()) == params  # same objects: the optimizer still holds them
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())
    _step(a, opt_a, x)
    _step(b, opt_b, x)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_release_without_contents_frees_and_restores_the_size_only():
    t = torch.arange(10, dtype=torch.float32)
    off = HostOffload([t], keep_contents=False)
    off.release()
    assert t.untyped_storage().nbytes() == 0 and off.host is None
    off.restore()
    assert t.shape == (10,) and t.untyped_storage().nbytes() == 40  # contents undefined until rewritten


class _RecordingTrainers:
    """Stands in for the TrainerGroup (whose offload only moves device memory: nothing to move on CPU)."""

    def __init__(self, log: list) -> None:
        self.log = log

    def offload(self) -> dict:
        self.log.append("trainer offload")
        return {"memory/trainer_offloaded_gib": 1.0}

    def onload(self) -> None:
        self.log.append("trainer onload")


def test_phases_release_and_resume_the_engines_tags_in_order():
    engine = EmbeddedEngine(EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT)))
    url = engine.start()
    log: list = []
    try:
        colo = Colocation(_RecordingTrainers(log), [url], None, train=True, rollout=True)
        released = lambda: engine.server_info()["memory_released"]  # noqa: E731
        m = colo.to_rollout()
        assert log == ["trainer offload"] and released() == [] and m["memory/trainer_offloaded_gib"] == 1.0
        m = colo.to_train()
        assert log[-1] == "trainer onload" and released() == ["kv_cache", "weights"]
        expected = {"memory/engine_active_gib", "memory/engine_idle_gib", "perf/onload_s", "perf/engine_release_s"}
        assert expected <= m.keys()
        colo.to_sync()
        assert released() == ["kv_cache"]  # weights back for the push; the KV cache comes with the next rollout
        colo.to_rollout()
        assert released() == []
        dead = Colocation(_RecordingTrainers(log), ["http://127.0.0.1:9"], None, train=False, rollout=True)
        dead.to_train()  # an engine that does not answer is left to recovery, not an error
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    ("flags", "train", "rollout"),
    [
        ("--colocate", True, True),
        ("--colocate --no-offload-rollout", True, False),
        ("--colocate --no-offload-train --no-offload-rollout", False, False),
    ],
)
def test_offload_is_on_with_colocate_on_gpus_only(flags, train, rollout):
    cfg = parse_args(f"{flags} --update-weight-transfer-mode tensor".split())
    colo = Colocation.of(cfg, None, [], "", use_gpu=True)
    assert (colo.offload_train, colo.offload_rollout) == (train, rollout)
    assert not Colocation.of(cfg, None, [], "", use_gpu=False).enabled  # CPU: no device memory is shared


def test_offload_flags_need_colocate():
    with pytest.raises(ValueError, match="need --colocate"):
        parse_args(["--offload-train"])
