"""Torch trainer backend: micro-batch and data-parallel invariance (real gloo), routing replay, resume."""

from __future__ import annotations

import random
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glm_rl.config import AlgoConfig, ModelConfig, RoutingReplay, TrainConfig
from glm_rl.rollout.samples import Sample
from glm_rl.trainer.backends.base import TrainerBackend, routing_source
from glm_rl.trainer.backends.torch_backend import TorchBackend
from glm_rl.trainer.batching import pack_micro_batches, split_for_dp


def make_samples(n: int, seed: int = 0, n_moe: int = 3, top_k: int = 2) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [1, 2, 4, 23] + [rng.randint(7, 16) for _ in range(rng.randint(2, 6))] + [5, 23]
        response = [rng.randint(7, 20) for _ in range(rng.randint(3, 9))] + [0]
        n_pos = len(prompt) + len(response) - 1
        routed = np.stack(
            [np.stack([np.array(rng.sample(range(8), top_k)) for _ in range(n_moe)]) for _ in range(n_pos)]
        ).astype(np.int16)
        s = Sample(
            index=i,
            group=i // 4,
            prompt_ids=prompt,
            response_ids=response,
            rollout_logprobs=[-rng.random() for _ in response],
            reward=float(rng.random() < 0.5),
            advantage=rng.uniform(-1, 1),
            routed_experts=routed,
        )
        s.old_logprobs = np.asarray(s.rollout_logprobs, dtype=np.float32) + 0.01
        s.token_weights = np.ones(len(response), dtype=np.float32)
        s.token_mask = np.ones(len(response), dtype=np.float32)
        out.append(s)
    return out


def backend(max_tokens=4096, **algo) -> TorchBackend:
    torch.manual_seed(0)
    return TorchBackend(
        ModelConfig(),
        TrainConfig(max_tokens_per_gpu=max_tokens, lr=1e-2),
        AlgoConfig(**{"use_rollout_routing_replay": False, **algo}),
        temperature=1.0,
    )


def global_tokens(samples):
    return float(sum(s.token_mask.sum() for s in samples))


def test_pack_respects_budget_and_keeps_every_sample():
    samples = make_samples(20)
    mbs = pack_micro_batches(samples, 64)
    assert sorted(s.index for mb in mbs for s in mb) == list(range(20))
    assert all(len(mb) * max(s.num_positions for s in mb) <= 64 for mb in mbs)
    with pytest.raises(ValueError, match="over --max-tokens-per-gpu 8"):
        pack_micro_batches(samples, 8)


def test_split_for_dp_balances_tokens():
    shards = split_for_dp(make_samples(16), 2)
    loads = [sum(s.num_positions for s in sh) for sh in shards]
    assert sorted(s.index for sh in shards for s in sh) == list(range(16))
    assert abs(loads[0] - loads[1]) <= max(s.num_positions for s in make_samples(16))


@pytest.mark.parametrize("estimator", ["grpo", "gspo"])
def test_micro_batch_split_gives_same_update(estimator):
    samples = make_samples(12)
    a, b = backend(4096, advantage_estimator=estimator), backend(48, advantage_estimator=estimator)
    assert len(b._micro_batches(samples, "train")) > 3
    ma = a.train_step(samples, global_tokens(samples))
    mb = b.train_step(samples, global_tokens(samples))
    assert ma["train/grad_norm"] == pytest.approx(mb["train/grad_norm"], rel=1e-5)
    # compare gradients (Adam's first step is sign-like, so parameters would amplify rounding noise)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=n)


def _dp_worker(rank, world, port, samples, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    b = backend(4096)
    shards = split_for_dp(samples, world)
    b.train_step(shards[rank], global_tokens(samples))
    if rank == 0:
        queue.put({n: p.grad.numpy().copy() for n, p in b.model.named_parameters()})  # numpy: no shm handles
    dist.barrier()
    dist.destroy_process_group()


def test_data_parallel_two_ranks_equal_one_rank():
    """Real gloo process group, 2 processes: the all-reduced gradient equals the single-process gradient on the
    full batch."""
    samples = make_samples(12)
    single = backend(4096)
    single.train_step(samples, global_tokens(samples))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_dp_worker, args=(r, 2, port, samples, queue)) for r in range(2)]
    for p in procs:
        p.start()
    state = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    for name, p in single.model.named_parameters():
        torch.testing.assert_close(torch.from_numpy(state[name]), p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_r3_replay_changes_logprobs_and_reports_agreement():
    samples = make_samples(6)
    plain = backend(4096).logprobs(samples)
    r3 = backend(4096, use_rollout_routing_replay=True).logprobs(samples)
    assert plain["replay_total"] == 0
    assert r3["replay_total"] == sum(s.num_positions for s in samples) * 3
    assert r3["replay_agree"] < r3["replay_total"]  # random engine routing disagrees with the model's
    assert max(np.abs(plain["old"][i] - r3["old"][i]).max() for i in range(6)) > 1e-3


def test_replayed_routing_follows_the_replay_mode():
    """R3 replays the engine's routing in every pass; R2 replays the trainer's own record in training only (the
    old-logprob pass records it); off replays nothing."""
    s = make_samples(1)[0]
    s.trainer_routing = s.routed_experts.copy()
    for phase in ("logprob", "train"):
        assert routing_source(RoutingReplay.R3, phase)(s) is s.routed_experts
        assert routing_source(RoutingReplay.OFF, phase) is None
    assert routing_source(RoutingReplay.R2, "logprob") is None
    assert routing_source(RoutingReplay.R2, "train")(s) is s.trainer_routing


def test_both_backends_meet_the_trainer_backend_contract():
    from glm_rl.trainer.backends.megatron.backend import MegatronBackend

    assert isinstance(backend(4096), TrainerBackend)
    assert issubclass(MegatronBackend, TrainerBackend)  # its instances need megatron's process groups


def test_r2_records_then_replays_identically():
    samples = make_samples(6)
    b = backend(4096, use_routing_replay=True)
    res = b.logprobs(samples)
    assert len(res["routing"]) == 6
    for s in samples:
        s.old_logprobs = res["old"][s.index]
        s.trainer_routing = res["routing"][s.index]
        assert s.trainer_routing.shape == (s.num_positions, 3, 2)
    m = b.train_step(samples, global_tokens(samples))
    assert m["train/ppo_kl"] == pytest.approx(0.0, abs=1e-7)  # same weights, same routing → ratio 1
    agree, total = b.replay.take_agreement()
    assert total == 0 or agree == total


def test_save_load_round_trip(tmp_path):
    samples = make_samples(8)
    a = backend(4096)
    a.train_step(samples, global_tokens(samples))
    a.save(tmp_path / "ck")
    b = backend(4096)
    b.load(tmp_path / "ck")
    a.train_step(samples, global_tokens(samples))
    b.train_step(samples, global_tokens(samples))
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize(
    "replay", [{}, {"use_rollout_routing_replay": True}, {"use_routing_replay": True}], ids=["off", "r3", "r2"]
)
def test_warm_up_leaves_the_next_step_bitwise_unchanged(replay):
    """`warm_up` (run on GPUs at startup) trains nothing: after it, weights, optimizer state and the next step's
    gradients and weights are bitwise those of a backend that was not warmed up, under each routing replay mode
    (R3 warms up with synthetic engine routing, R2 with the routing its own old-logprob pass recorded)."""
    samples = make_samples(8)
    cold, warm = backend(**replay), backend(**replay)
    warm.warm_up(300)
    assert not warm.opt.state and all(p.grad is None or not p.grad.any() for p in warm.model.parameters())
    if warm.algo.routing_replay is RoutingReplay.R2:
        for s, routing in warm.logprobs(samples)["routing"].items():
            samples[s].trainer_routing = routing
    for b in (cold, warm):
        b.train_step(samples, global_tokens(samples))
    for (n, p), (_, q) in zip(cold.model.named_parameters(), warm.model.named_parameters()):
        assert torch.equal(p.grad, q.grad) and torch.equal(p, q), n


class _OneRank:
    """The two TrainerGroup calls `steps` makes, on one in-process rank (dp_size 1)."""

    dp_size = 1

    def __init__(self, b: TorchBackend) -> None:
        self.b = b

    def logprobs(self, shards):
        return [self.b.logprobs(shards[0])]

    def train_step(self, shards, global_tokens):
        return [self.b.train_step(shards[0], global_tokens)]


@pytest.mark.parametrize("algo", [{"use_rollout_routing_replay": True}, {"use_tis": False}], ids=["r3-tis", "plain"])
def test_old_logprobs_from_the_training_forward_equal_the_separate_pass(algo):
    """The default on-policy step (`steps.old_logprobs_in_training`): old logprobs, TIS weights and mismatch
    metrics taken from the training forward give the same update and the same metrics as the separate
    old-logprob pass + driver corrections (fp32 CPU: gradients bitwise), with R3 + TIS and without either."""
    from glm_rl.trainer import steps

    samples_a, samples_b = make_samples(12), make_samples(12)
    a, b = backend(96, **algo), backend(96, **algo)  # several micro-batches
    assert len(a._micro_batches(samples_a, "train")) > 2
    cfg = a.algo
    train_cfg = a.cfg
    assert steps.old_logprobs_in_training(samples_b, cfg, train_cfg)
    ma = steps.old_logprobs(samples_a, cfg, _OneRank(a)) | steps.corrections(samples_a, cfg)
    ma |= steps.train(samples_a, train_cfg, _OneRank(a))
    steps.leave_old_logprobs_to_training(samples_b)
    mb = steps.train(samples_b, train_cfg, _OneRank(b))
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p.grad, q.grad), n
    for key in ("mismatch/logprob_abs_diff_mean", "mismatch/k3_kl", "train/pg_loss", "train/pg_clipfrac"):
        assert mb[key] == pytest.approx(ma[key], rel=1e-5, abs=1e-9), key
    assert mb["mismatch/logprob_abs_diff_max"] == ma["mismatch/logprob_abs_diff_max"]
    if cfg.use_tis:
        for key in ("correction/tis_weight_mean", "correction/tis_clipfrac"):
            assert mb[key] == pytest.approx(ma[key], rel=1e-5), key


def test_old_logprob_pass_runs_when_the_training_forward_cannot_stand_in():
    """The separate pass still runs whenever its result is needed before training or differs from it."""
    from glm_rl.config import TrainConfig as T
    from glm_rl.trainer import steps

    samples = make_samples(8)
    on = lambda train=None, **a: steps.old_logprobs_in_training(samples, AlgoConfig(**a), train or T())  # noqa: E731
    assert on() and on(T(global_batch_size=8))
    assert not on(T(global_batch_size=4))  # two optimizer steps: the second's old weights are gone
    assert not on(enable_mis=True, use_tis=False)  # MIS normalises over the batch before training
    assert not on(kl_loss_coef=0.1)
    assert not on(use_routing_replay=True, use_rollout_routing_replay=False)  # R2 replays what the pass records
    assert not on(use_rollout_logprobs=True) and not on(recompute_old_logprobs=True)


def test_torch_backend_logprobs_equal_a_full_fp32_log_softmax():
    """The backend's logprobs and entropy (read from the logits in row chunks, trainer/logprobs.py, since the
    fp32 copy of the whole (B, T, V) went) equal log_softmax / entropy of (logits / T) in fp32, at T = 0.7, up to
    fp32 rounding."""
    import torch.nn.functional as F

    from glm_rl.algo import entropy_from_logits

    b = TorchBackend(ModelConfig(), TrainConfig(), AlgoConfig(), temperature=0.7)
    mb = b._micro_batches(make_samples(6), "logprob")[0]
    logp, entropy = b._forward(b.model, mb, with_entropy=True)
    with torch.no_grad():
        z = b.model(input_ids=mb.input_ids, use_cache=False).logits.float() / 0.7
    ref = torch.gather(F.log_softmax(z, -1), -1, mb.targets[..., None]).squeeze(-1)
    torch.testing.assert_close(logp.detach(), ref, rtol=1e-6, atol=2e-6)  # fp32 rounding of |logp| ~ 20
    torch.testing.assert_close(entropy.detach(), entropy_from_logits(z), rtol=0, atol=1e-5)  # log Z - E[z]: cancels
