"""Engines killed at each point of a step (before rollout, during rollout, during old-logprobs, during the weight
sync, all of them at once), a trainer rank killed, engines that never come back; and, below the runtime, each
weight transport losing an engine mid-push. Real Ray actors, real sglang-router, real engines; every kill is a
SIGKILL of the engine's process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
import ray
import torch

from glm_rl.config import parse_args
from glm_rl.models.glm45.checkpoint import load_hf_model
from glm_rl.models.glm45.presets import TINY_CHECKPOINT
from glm_rl.recovery import EnginesLost
from glm_rl.rollout.engine_client import EngineClient
from glm_rl.runtime import Runtime
from glm_rl.train import run_step
from glm_rl.trainer import steps
from glm_rl.trainer.group import TrainerRankDied
from glm_rl.weights.transports import BroadcastTransport, TensorTransport
from glm_rl.weights.wire import tensor_checksum

BATCH, N = 8, 4


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    """One runtime for the whole module (each test leaves it healthy; the trainer-death test comes last).
    Tensors go one per bucket, so a sync lasts long enough to be hit."""
    cfg = parse_args(
        [
            "--output-dir",
            str(tmp_path_factory.mktemp("ft")),
            "--rollout-batch-size",
            str(BATCH),
            "--n-samples-per-prompt",
            str(N),
            "--num-rollout",
            "20",
            "--no-report",
            "--update-weight-buffer-size",
            "1024",
        ]
    )
    rt = Runtime.start(cfg)
    rt.step = 0
    yield cfg, rt
    rt.shutdown()
    ray.shutdown()


def _step(cfg, rt) -> dict:
    metrics = run_step(cfg, rt, rt.step)
    rt.step += 1
    return metrics


def _kill_engine(rt, i: int) -> None:
    pid = ray.get(rt.engines[i].__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    os.kill(pid, signal.SIGKILL)


def _kill_later(rt, i: int, delay_s: float) -> threading.Thread:
    """SIGKILL engine i's process in `delay_s` seconds; the thread's `killed_at` is when (monotonic)."""
    pid = ray.get(rt.engines[i].__ray_call__.remote(lambda self: os.getpid()), timeout=30)

    def kill() -> None:
        os.kill(pid, signal.SIGKILL)
        killer.killed_at = time.monotonic()

    killer = threading.Timer(delay_s, kill)
    killer.killed_at = float("inf")
    killer.start()
    return killer


def _assert_served_and_current(cfg, rt, metrics: dict, restarted: int) -> None:
    assert metrics["engines/restarted"] == restarted
    assert metrics["sync/verified"] == 1.0 and metrics["engines/dead"] == 0.0
    assert metrics["rollout/num_samples"] == metrics["train/num_samples"] == BATCH * N  # none lost or duplicated
    for url in rt.engine_urls:  # every engine serves, through the router, the trainer's current weights
        assert EngineClient(url).health()
        assert EngineClient(url, api_key=rt.api_key).model_info()["weight_version"] == rt.weight_version
    assert sorted(w["url"] for w in rt.router.workers()) == sorted(rt.engine_urls)


def test_engine_killed_before_rollout(runtime):
    cfg, rt = runtime
    first = _step(cfg, rt)
    assert first["sync/verified"] == 1.0 and first["engines/restarted"] == 0.0
    old_url = rt.engine_urls[0]
    _kill_engine(rt, 0)
    metrics = _step(cfg, rt)
    _assert_served_and_current(cfg, rt, metrics, restarted=1)
    assert rt.engine_urls[0] != old_url


def test_engine_killed_during_rollout(runtime, monkeypatch):
    cfg, rt = runtime
    rollout, times = rt.rollout, {}

    def rollout_with_kill(step):
        killer = _kill_later(rt, 1, 0.05)
        out = rollout(step)
        times["killed"], times["done"] = killer.killed_at, time.monotonic()
        return out

    monkeypatch.setattr(rt, "rollout", rollout_with_kill)
    metrics = _step(cfg, rt)
    assert times["killed"] < times["done"]  # mid-rollout: its requests were retried (router or manager) elsewhere
    _assert_served_and_current(cfg, rt, metrics, restarted=1)


def test_engine_killed_during_training(runtime, monkeypatch):
    """Killed while the trainer works (the old logprobs come from the training forward by default: one stage)."""
    cfg, rt = runtime
    train = steps.train

    def with_kill(*args, **kwargs):
        _kill_engine(rt, 0)
        return train(*args, **kwargs)

    monkeypatch.setattr(steps, "train", with_kill)
    metrics = _step(cfg, rt)
    _assert_served_and_current(cfg, rt, metrics, restarted=1)


def test_engine_killed_during_sync(runtime, monkeypatch):
    """Killed 50 ms into the push (71 buckets of one tensor): the broadcast transport marks it dead, builds its
    group again and finishes on the other; the runtime restarts it and pushes again. No gloo timeout is waited."""
    cfg, rt = runtime
    push, results = rt.trainers.push_weights, []

    def push_with_kill(version):
        killer = _kill_later(rt, 1, 0.05) if not results else None
        results.append(push(version))
        if killer is not None:
            killer.join()
        return results[-1]

    monkeypatch.setattr(rt.trainers, "push_weights", push_with_kill)
    t0 = time.time()
    metrics = _step(cfg, rt)
    assert results[0]["dead"] == [1] and results[0]["verified"]  # seen mid-push; the other engine verified
    assert results[-1]["dead"] == [] and results[-1]["verified"]  # the restarted engine got the weights
    _assert_served_and_current(cfg, rt, metrics, restarted=1)
    assert time.time() - t0 < 45


def test_every_engine_killed_mid_rollout_redoes_it_from_the_same_prompts(runtime, monkeypatch):
    cfg, rt = runtime
    before = ray.get(rt.rollout_manager.data_state.remote())
    rollout = rt.rollout

    def rollout_with_kills(step):
        for i in range(len(rt.engines)):
            _kill_later(rt, i, 0.1)
        return rollout(step)

    monkeypatch.setattr(rt, "rollout", rollout_with_kills)
    metrics = _step(cfg, rt)
    assert metrics["rollout/redone"] == 1.0
    after = ray.get(rt.rollout_manager.data_state.remote())
    assert after["epoch"] == before["epoch"] and after["offset"] == before["offset"] + BATCH  # no prompt skipped
    _assert_served_and_current(cfg, rt, metrics, restarted=2)


def test_engines_that_never_come_back_stop_the_run_naming_them(runtime, monkeypatch):
    cfg, rt = runtime

    class Broken:
        returns_routing_by_default = rt.launcher.returns_routing_by_default

        def launch(self, *args):
            raise RuntimeError("no resources for an engine")

    launcher = rt.launcher
    monkeypatch.setattr(rt, "launcher", Broken())
    monkeypatch.setattr(rt.recovery, "timeout_s", 3.0)
    urls = list(rt.engine_urls)
    for i in range(len(rt.engines)):
        _kill_engine(rt, i)
    time.sleep(0.5)
    with pytest.raises(EnginesLost, match="every engine is dead") as e:
        rt.ensure_engines()
    assert all(u in str(e.value) for u in urls)
    monkeypatch.setattr(rt, "launcher", launcher)  # they can come back now
    assert rt.ensure_engines()["engines/restarted"] == 2.0
    _assert_served_and_current(cfg, rt, _step(cfg, rt), restarted=0)


def test_trainer_rank_killed_names_the_rank(runtime):
    cfg, rt = runtime
    pid = ray.get(rt.trainers.actors[1].__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    os.kill(pid, signal.SIGKILL)
    t0 = time.time()
    with pytest.raises(TrainerRankDied, match="trainer rank 1 died"):
        _step(cfg, rt)
    assert time.time() - t0 < 60


# -- below the runtime: each transport loses an engine mid-push ---------------------------------------------------
@pytest.fixture
def engine_procs():
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "glm_rl.engine", "--hf-checkpoint", str(TINY_CHECKPOINT), "--port", "0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        urls = [p.stdout.readline().split()[1] for p in procs]
        yield procs, urls
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)


def _weights(seed: int) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (n, t + 0.01 * torch.randn(t.shape, generator=gen))
        for n, t in load_hf_model(TINY_CHECKPOINT)[0].state_dict().items()
    ]


@pytest.mark.parametrize("transport", [TensorTransport, BroadcastTransport])
def test_transport_finishes_the_sync_without_an_engine_killed_mid_push(engine_procs, transport):
    """Engine 0's process is killed while its 10th bucket is in flight (for broadcast: while it waits in gloo's
    receive, the case where gloo may block the source until its timeout)."""
    procs, urls = engine_procs
    t = transport(urls, None, bucket_bytes=1024)
    t.prepare()
    name = "update_weights_from_tensor" if transport is TensorTransport else "update_weights_from_distributed"
    client, calls = t.clients[0], []
    real = getattr(client, name)

    def call_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:
            threading.Timer(0.05, procs[0].kill).start()
        return real(*args, **kwargs)

    setattr(client, name, call_then_die)
    named = _weights(1)
    t0 = time.time()
    result = t.push(named, 1, verify=True)
    assert result["dead"] == [0] and result["verified"]
    assert time.time() - t0 < 30
    answer = EngineClient(urls[1]).weights_checksum([n for n, _ in named])
    assert answer["weight_version"] == 1
    assert answer["checksums"] == {n: tensor_checksum(x) for n, x in named}  # the live engine got all of it
    t.close()


def test_a_failure_that_is_no_death_is_raised(engine_procs):
    _, urls = engine_procs
    t = TensorTransport(urls, None, bucket_bytes=1 << 20)
    bad = [(n, x) for n, x in _weights(2)] + [("not.a.weight", torch.zeros(3))]
    with pytest.raises(Exception, match="not.a.weight"):
        t.push(bad, 1, verify=False)
    assert t.dead == set()
    t.close()


def test_engine_launchers_follow_the_replay_decision():
    """Both engine kinds are `RolloutEngine`s to the runtime; the launcher derives every engine-side routing
    setting from `engines_return_routed_experts`, and says whether routed experts survive the router."""
    from glm_rl.engine import EmbeddedEngine
    from glm_rl.ray.engines import RolloutEngine, engine_launcher
    from glm_rl.rollout.sglang_engine import SGLangEngine

    assert issubclass(EmbeddedEngine, RolloutEngine) and issubclass(SGLangEngine, RolloutEngine)
    for routed in (True, False):
        cfg = parse_args([] if routed else ["--no-use-rollout-routing-replay"])
        kw = dict(routed_experts=routed, seed=cfg.seed, colocate=False, use_gpu=False, api_key="k")
        embedded = engine_launcher(cfg.rollout, cfg.model, **kw)
        assert embedded.config.record_routed_experts is embedded.config.return_routed_experts_by_default is routed
        assert embedded.returns_routing_by_default is routed  # R3 requests may go through the router
        sglang = engine_launcher(replace(cfg.rollout, rollout_engine="sglang"), cfg.model, **kw)
        assert sglang.config.enable_return_routed_experts is routed
        assert sglang.returns_routing_by_default is False  # the router drops the flag: R3 goes to engines directly


def test_max_running_requests_reaches_both_engine_kinds():
    """`--max-running-requests`: the embedded engine's batch (unset: the engine sizes it when it starts, 64 on CPU:
    test_engine_batch_sizing.py); SGLang's own flag, passed only when set (SGLang sizes it from memory otherwise),
    in a command SGLang's flag list accepts."""
    from glm_rl.ray.engines import engine_launcher
    from glm_rl.rollout.sglang_engine import build_command, check_server_flags

    kw = dict(routed_experts=True, seed=0, colocate=False, use_gpu=False, api_key="k")
    for argv, embedded_batch, sglang_flag in (([], None, None), (["--max-running-requests", "512"], 512, "512")):
        cfg = parse_args(argv)
        assert engine_launcher(cfg.rollout, cfg.model, **kw).config.max_batch_size == embedded_batch
        sglang = engine_launcher(replace(cfg.rollout, rollout_engine="sglang"), cfg.model, **kw)
        cmd = build_command(sglang.config)
        check_server_flags(cmd)
        given = cmd[cmd.index("--max-running-requests") + 1] if "--max-running-requests" in cmd else None
        assert given == sglang_flag
    with pytest.raises((ValueError, SystemExit), match="--max-running-requests must be >= 1"):
        parse_args(["--max-running-requests", "0"])
