"""Megatron trainer backend in the RL loop: gradient parity across layouts (spawned gloo processes), routing
replay through megatron-core's RouterReplay, and config validation of the Megatron flags.

Layout cases run in fresh spawned processes (the CPU shims patch megatron process-wide) with
TORCHDYNAMO_DISABLE=1. A case runs the old-logprob pass (R3 replay of given routing) and one optimizer step on
the same global batch, split over DP ranks as the driver does, then exports HF tensors: TP2 (+SP), EP2, PP2
(uneven, through megatron's 1F1B schedule, with activation recompute), CP2 and CP2 x TP2 must give TP1's
numbers, and TP1 (which runs the same schedule code) must give the torch backend's.
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")

from test_trainer_backend import make_samples  # noqa: E402  (the torch backend's sample maker, same tiny vocab)

PARITY = 1e-5  # logprobs and weights after one step (fp32)
GRAD_PARITY = 1e-6  # gradients are ~1e-3 here; a sharding or reduction error is of that order


def _worker(
    rank: int, world: int, store: str, out_path: str, layout: dict, algo: dict, mtp_control: bool = False
) -> None:
    os.environ["TORCHDYNAMO_DISABLE"] = "1"  # before megatron is imported: jit_fuser would torch.compile
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from glm_rl.config import AlgoConfig, MegatronConfig, ModelConfig, TrainConfig
    from glm_rl.trainer.backends.megatron.backend import MegatronBackend

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        train = TrainConfig(backend="megatron", num_trainer_ranks=world, lr=1e-2, max_tokens_per_gpu=64)
        megatron = MegatronConfig(**layout)
        b = MegatronBackend(ModelConfig(), train, AlgoConfig(**algo), megatron_cfg=megatron, temperature=1.0)
        samples = make_samples(8)
        # DP ranks get 6 and 2 samples: unequal micro-batch counts, so the lighter rank runs pad batches to keep
        # the expert all-to-alls paired (the loss is normalised globally, so any split gives the same step)
        shard = samples if megatron.dp_size(world) == 1 else [samples[:6], samples[6:]][ps.get_data_parallel_rank()]
        tokens = float(sum(s.token_mask.sum() for s in samples))
        # R2 on the initial weights: record in the old-logprob pass, replay it in a training pass (its
        # optimizer step skipped, so the R3 step below starts from the same weights)
        r3_algo = b.algo
        b.algo = replace(r3_algo, use_routing_replay=True, use_rollout_routing_replay=False)
        r2 = b.logprobs(shard)
        for s in shard:
            s.trainer_routing = r2["routing"][s.index]
        step, b.opt.step = b.opt.step, lambda: None
        r2_metrics = b.train_step(shard, tokens)
        local_grads, reduce = {}, b._reduce_grads_and_clip

        def snapshot() -> float:  # this rank's gradients before the cross-rank sums (the CP control)
            local_grads.update({n: p.grad.clone() for n, p in b.model.named_parameters() if p.grad is not None})
            return reduce()

        b._reduce_grads_and_clip = snapshot
        b.algo, b.opt.step = r3_algo, step
        # R3 (the engine's routing, here random): old logprobs, then one optimizer step
        res = b.logprobs(shard)
        olds = [None] * world  # only a last pipeline stage has logprobs: the driver hands them to every rank
        dist.all_gather_object(olds, res["old"])
        old = {i: lp for o in olds for i, lp in o.items()}
        for s in shard:
            s.old_logprobs = old[s.index] + 0.01  # a ratio != 1 so the clip terms take part
        control = _mtp_control_grads(b, shard, tokens) if mtp_control else None
        metrics = b.train_step(shard, tokens)
        exported = dict(b.named_tensors())
        for param in b.model.parameters():  # the summed, clipped gradients, in HF layout through the same bridge
            param.data = param.grad.clone()
        grads = dict(b.named_tensors())
        from glm_rl.trainer.batching import pack_micro_batches

        own_batches = len(pack_micro_batches(shard, train.max_tokens_per_gpu))
        gathered = [None] * world
        dist.all_gather_object(
            gathered,
            {
                "old": res["old"],
                "agree": (res["replay_agree"], res["replay_total"]),
                "metrics": metrics,
                "r2_routing": r2["routing"],
                "r2_metrics": r2_metrics,
                "tp_rank": ps.get_tensor_model_parallel_rank(),
                "stage_layers": len(b.model.decoder.layers),
                "embedding": (
                    b.model.embedding.word_embeddings.weight.detach().clone() if hasattr(b.model, "embedding") else None
                ),
                "micro_batches": (own_batches, len(b._micro_batches(shard, "train"))),
            },
        )
        if rank == 0:
            torch.save(
                {
                    "weights": exported,
                    "grads": grads,
                    "ranks": gathered,
                    "local_grads": local_grads,
                    "mtp_control_grads": control,
                },
                out_path,
            )
    finally:
        dist.destroy_process_group()


def _mtp_control_grads(b, shard, tokens) -> dict:
    """The control for CP + MTP training: the same step (optimizer step skipped) with megatron's default CP
    weighting, each CP rank's MTP loss normalised by its own MTP tokens (every rank's count taken as the whole
    micro-batch's, so the backend's correction is 1); the summed gradients in HF layout."""
    from unittest import mock

    from glm_rl.trainer.backends.megatron import backend

    exact = backend.mtp_token_counts

    def per_rank(mask, layers, cp_rank, cp):
        counts = exact(mask, layers, cp_rank, cp)
        return torch.stack([counts[:, 1], counts[:, 1]], dim=1)

    step, b.opt.step = b.opt.step, lambda: None
    with mock.patch.object(backend, "mtp_token_counts", per_rank):
        b.train_step(shard, tokens)
    b.opt.step = step
    params = list(b.model.parameters())
    weights = [p.data for p in params]
    for p in params:
        p.data = p.grad.clone()
    grads = dict(b.named_tensors())
    for p, w in zip(params, weights):
        p.data = w
    return grads


def _run(
    tmp_path,
    tp: int = 1,
    ep: int = 1,
    pp: int = 1,
    cp: int = 1,
    last_stage_layers: int | None = None,
    recompute: bool = False,
    mtp: bool = False,
    mtp_control: bool = False,
    **algo,
) -> dict:
    """One layout's case on TP x PP x CP x EP ranks (EP ranks double as DP ranks); `recompute`: full activation
    recompute of every layer; `mtp`: --enable-mtp-training; `mtp_control`: also the step's gradients under
    megatron's default CP weighting of the MTP loss (`_mtp_control_grads`)."""
    import torch.multiprocessing as mp

    world = tp * pp * cp * ep
    layout = dict(
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        decoder_last_pipeline_num_layers=last_stage_layers,
    )
    if recompute:
        layout |= dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    layout["enable_mtp_training"] = mtp
    algo = {"use_rollout_routing_replay": True, "entropy_coef": 0.01, **algo}  # entropy: TP-parallel too
    name = f"tp{tp}_ep{ep}_pp{pp}_cp{cp}_rc{int(recompute)}_mtp{int(mtp)}"
    out, store = tmp_path / f"{name}.pt", tmp_path / f"store_{name}"
    mp.spawn(_worker, args=(world, str(store), str(out), layout, algo, mtp_control), nprocs=world, join=True)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("tp1"))


@pytest.fixture(scope="module")
def tp1_mtp(tmp_path_factory):
    """The reference for the MTP-training layouts: world size 1, --enable-mtp-training."""
    return _run(tmp_path_factory.mktemp("tp1_mtp"), mtp=True)


def _merged(r: dict, key: str) -> dict:
    """A per-sample dict of every rank's results (TP peers report the same samples)."""
    out = {}
    for rank in r["ranks"]:
        out.update(rank[key])
    return out


def _check_parity(ref: dict, got: dict) -> None:
    """Old logprobs, gradients (all-reduced and clipped, in HF layout) and the weights after the AdamW step.
    Weights are compared where |grad| > 1e-6 only: Adam's first step is lr·g/(|g| + eps), so for gradients near
    eps a 1e-9 summation-order difference legitimately flips the update; elsewhere it is well conditioned."""
    ref_old, got_old = _merged(ref, "old"), _merged(got, "old")
    assert sorted(got_old) == list(range(8))
    assert max(np.abs(ref_old[i] - got_old[i]).max() for i in ref_old) <= PARITY
    assert set(ref["weights"]) == set(got["weights"]) == set(ref["grads"])
    grad_diff = {k: (ref["grads"][k] - got["grads"][k]).abs().max().item() for k in ref["grads"]}
    worst = max(grad_diff, key=grad_diff.get)
    assert grad_diff[worst] <= GRAD_PARITY, f"gradient of {worst} differs by {grad_diff[worst]:.3g}"
    assert sum(g.abs().sum().item() for g in ref["grads"].values()) > 1e-3  # there is a gradient to compare
    weight_diff = {
        k: ((ref["weights"][k] - got["weights"][k]).abs() * (ref["grads"][k].abs() > 1e-6)).max().item()
        for k in ref["weights"]
    }
    worst = max(weight_diff, key=weight_diff.get)
    assert weight_diff[worst] <= PARITY, f"{worst} differs by {weight_diff[worst]:.3g} after one step"
    g_ref = ref["ranks"][0]["metrics"]["train/grad_norm"]
    assert all(abs(r["metrics"]["train/grad_norm"] - g_ref) <= 1e-5 * g_ref for r in got["ranks"])
    # R2: the routing recorded on the initial weights is TP1's (gathered back over the SP split), and
    # replaying it in training agrees with the router's own choice everywhere
    ref_routing, got_routing = _merged(ref, "r2_routing"), _merged(got, "r2_routing")
    assert sorted(got_routing) == list(range(8))
    for i, chosen in ref_routing.items():
        assert got_routing[i].shape == chosen.shape == (make_samples(8)[i].num_positions, 3, 2)
        assert np.array_equal(np.sort(got_routing[i], -1), np.sort(chosen, -1)), i
    assert all(r["r2_metrics"]["routing/train_replay_agreement"] == 1.0 for r in got["ranks"])


def test_tp1_step_moves_weights_and_replays_all_tokens(tp1):
    from glm_rl.models.glm45.checkpoint import load_hf_model
    from glm_rl.models.glm45.presets import TINY_CHECKPOINT

    hf, _ = load_hf_model(TINY_CHECKPOINT)
    moved = {k: (tp1["weights"][k] - v).abs().max().item() for k, v in hf.state_dict().items()}
    assert moved["model.layers.1.mlp.experts.gate_up_proj"] > 1e-4  # the step reached the replayed experts
    assert moved["model.layers.1.mlp.gate.weight"] > 1e-4  # and the router (gates are its scores)
    assert moved["model.layers.1.mlp.gate.e_score_correction_bias"] == 0.0  # bias update rate 0 in RL
    agree, total = tp1["ranks"][0]["agree"]
    assert total == sum(s.num_positions for s in make_samples(8)) * 3  # every real token, every MoE layer
    assert agree < total  # the given routing is random: replay forced choices the router would not make


def test_tp1_step_equals_the_torch_backend(tp1):
    """The anchor for every layout below (they are compared with TP1, which runs the same schedule code): the
    HF model in the torch backend, same samples, old logprobs and config, gives TP1's logprobs, loss, gradient
    norm and clipped gradients. A loss mis-scaled by the schedule (e.g. by the micro-batch count) fails here."""
    from glm_rl.config import AlgoConfig, ModelConfig, TrainConfig
    from glm_rl.trainer.backends.torch_backend import TorchBackend

    torch.manual_seed(0)
    b = TorchBackend(
        ModelConfig(),
        TrainConfig(max_tokens_per_gpu=64, lr=1e-2),
        AlgoConfig(use_rollout_routing_replay=True, entropy_coef=0.01),
        temperature=1.0,
    )
    samples = make_samples(8)
    res, mega_old = b.logprobs(samples), _merged(tp1, "old")
    assert max(np.abs(res["old"][i] - mega_old[i]).max() for i in range(8)) <= 1e-4
    for s in samples:
        s.old_logprobs = mega_old[s.index] + 0.01
    metrics = b.train_step(samples, float(sum(s.token_mask.sum() for s in samples)))
    ref = tp1["ranks"][0]["metrics"]
    assert metrics["train/grad_norm"] == pytest.approx(ref["train/grad_norm"], rel=1e-4)
    assert metrics["train/pg_loss"] == pytest.approx(ref["train/pg_loss"], rel=1e-4, abs=1e-6)
    grads = {n: p.grad for n, p in b.model.named_parameters()}
    assert max((grads[n] - tp1["grads"][n]).abs().max().item() for n in grads) <= 1e-5


def test_tp2_sequence_parallel_step_equals_tp1(tmp_path, tp1):
    got = _run(tmp_path, tp=2)
    _check_parity(tp1, got)
    assert [r["agree"] for r in got["ranks"]] == [tp1["ranks"][0]["agree"]] * 2  # TP peers sum their halves


def test_ep2_step_equals_tp1(tmp_path, tp1):
    got = _run(tmp_path, ep=2)
    _check_parity(tp1, got)
    agree = [r["agree"] for r in got["ranks"]]
    assert tuple(map(sum, zip(*agree))) == tp1["ranks"][0]["agree"]  # DP ranks split the samples
    (own0, run0), (own1, run1) = [r["micro_batches"] for r in got["ranks"]]
    assert own0 > own1 and run0 == run1 == own0  # the lighter rank ran pad batches, and the step still matches


def test_pp2_uneven_pipeline_with_recompute_step_equals_tp1(tmp_path, tp1):
    """PP2 through megatron's 1F1B schedule, uneven (--decoder-last-pipeline-num-layers 1: stage 0 holds the dense
    layer and MoE layers 0-1, stage 1 MoE layer 2), with full activation recompute: same old logprobs,
    gradients, weights after the step and R2 record as TP1. Each stage replays its own slice of the routing
    (stage 1 from MoE layer offset 2) and the agreement summed over stages is TP1's. Recompute re-runs the
    routers in the backward pass, which 1F1B runs on stage 0 after the next micro-batch's forward: each layer
    must replay its own micro-batch's routing (megatron's REPLAY_BACKWARD queue, replay.py) — replaying the
    latest forward's routing instead was seen to fail here."""
    got = _run(tmp_path, pp=2, last_stage_layers=1, recompute=True)
    _check_parity(tp1, got)
    assert [r["stage_layers"] for r in got["ranks"]] == [3, 1]
    assert [r["agree"] for r in got["ranks"]] == [tp1["ranks"][0]["agree"]] * 2  # recomputes are not counted
    assert got["ranks"][0]["old"] == {} and len(got["ranks"][1]["old"]) == 8  # logprobs on the last stage only
    assert got["ranks"][0]["micro_batches"][1] > 2  # several micro-batches in flight through the schedule


def test_pp2_mtp_training_step_equals_pp1(tmp_path, tp1_mtp):
    """--enable-mtp-training with PP2: the MTP layer (and its copy of the word embeddings) on the last stage;
    the copy's gradient is summed with the first stage's (optim.py) so both copies take the same step. Same
    gradients, weights (MTP layer included) and MTP metrics as PP1."""
    ref, got = tp1_mtp, _run(tmp_path, pp=2, mtp=True)
    _check_parity(ref, got)
    assert {n for n in got["weights"] if n.startswith("model.layers.4.")}  # the MTP layer is compared too
    first, last = (r["embedding"] for r in got["ranks"])
    assert torch.equal(first, last)  # stage 0's is compared with PP1's through the export above
    for key in ("train/mtp_loss", "train/mtp_accuracy"):
        assert got["ranks"][1]["metrics"][key] == pytest.approx(ref["ranks"][0]["metrics"][key], rel=1e-5)


def test_cp2_mtp_training_step_equals_cp1(tmp_path, tp1_mtp):
    """--enable-mtp-training with CP2: each CP rank's MTP loss is megatron's mean over its own MTP tokens; the
    backend scales it per rank by its share of the micro-batch's MTP tokens, so the CP sum is CP1's loss. Same
    gradients, weights (MTP layer included, <= 1e-5 relative) and MTP metrics as CP1. Control: megatron's
    default weighting (each rank's own mean, unscaled) gives the MTP layer a different gradient."""
    got = _run(tmp_path, cp=2, mtp=True, mtp_control=True)
    _check_parity(tp1_mtp, got)
    mtp_names = [n for n in got["grads"] if n.startswith("model.layers.4.")]
    assert mtp_names  # the MTP layer is compared too

    ref_grads = tp1_mtp["grads"]
    # where the gradient is not near Adam's eps (_check_parity: there a first step may legitimately flip)
    conditioned = {n: ref_grads[n].abs() > 1e-6 for n in mtp_names}

    def rel(a: dict, b: dict) -> float:  # worst difference over the MTP layer, relative to each tensor's scale
        return max(
            float(((a[n] - b[n]).abs() * conditioned[n]).max() / b[n].abs().max().clamp(min=1e-12)) for n in mtp_names
        )

    assert rel(got["grads"], ref_grads) <= 1e-5
    assert rel(got["weights"], tp1_mtp["weights"]) <= 1e-5
    for r in got["ranks"]:  # every CP rank reports CP1's figures
        for key in ("train/mtp_loss", "train/mtp_accuracy"):
            assert r["metrics"][key] == pytest.approx(tp1_mtp["ranks"][0]["metrics"][key], rel=1e-5), key
    assert 0 < tp1_mtp["ranks"][0]["metrics"]["train/mtp_accuracy"] < 1  # a figure that can differ
    assert rel(got["mtp_control_grads"], ref_grads) > 1e-2  # control: per-rank normalisation is off (seen: 7.9)


def test_cp2_step_equals_tp1(tmp_path, tp1):
    """CP2: each rank runs its load-balanced chunks; the full logprobs are gathered (gradient back to the own
    chunks only) and the dense gradients summed over CP. Control: one CP rank's own gradient is a partial one."""
    got = _run(tmp_path, cp=2)
    _check_parity(tp1, got)
    assert [r["agree"] for r in got["ranks"]] == [tp1["ranks"][0]["agree"]] * 2  # CP peers sum their chunks
    # control: CP rank 0's gradient before the CP sum is far from the whole batch's (so the sum is what matches)
    ref, own = tp1["local_grads"], got["local_grads"]
    assert max((ref[n] - own[n]).abs().max().item() for n in ref) > 1e-4


@pytest.mark.slow  # 4 processes on the 2-core CI box
def test_cp2_tp2_sequence_parallel_step_equals_tp1(tmp_path, tp1):
    """CP2 x TP2 (+SP): the routing replay's token slice is the CP chunks, then the SP part of them."""
    got = _run(tmp_path, tp=2, cp=2)
    _check_parity(tp1, got)
    assert [r["agree"] for r in got["ranks"]] == [tp1["ranks"][0]["agree"]] * 4


# -- the RL loop: `glm-rl train --backend megatron` (real Ray, embedded engines, sglang-router, gloo) ----------
E2E = [
    "--backend",
    "megatron",
    "--num-trainer-ranks",
    "2",
    "--rollout-batch-size",
    "4",
    "--n-samples-per-prompt",
    "4",
    "--no-report",
]


def _train(out, *extra) -> list[dict]:
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "glm_rl.cli", "train", "--output-dir", str(out), *E2E, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _hf_tensors_without_mtp() -> int:
    """How many tensors the HF model of the tiny checkpoint holds (experts fused; no MTP layer)."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM

    import glm_rl

    cfg = AutoConfig.from_pretrained(Path(glm_rl.__file__).parent / "assets" / "glm45-tiny")
    with torch.device("meta"):
        return len(AutoModelForCausalLM.from_config(cfg).state_dict())


def _check_rl_rows(rows: list[dict], steps: list[int]) -> None:
    assert [r["step"] for r in rows] == steps
    assert rows[0]["train/ppo_kl"] == pytest.approx(0.0, abs=1e-6)  # same weights on both sides at step 1
    for r in rows:
        assert r["mismatch/logprob_abs_diff_max"] <= 1e-4  # megatron trainer vs the embedded engine, fp32
        assert r["routing/replay_agreement"] == 1.0  # R3: the engine's experts are the trainer's own
        assert r["sync/verified"] == 1.0  # every HF tensor bitwise on every engine
        assert r["train/num_samples"] == r["rollout/num_samples"] == 16
        assert r["train/num_tokens"] > 0 and r["train/grad_norm"] > 0


def _assert_mismatch_noise(resumed: dict, original: dict) -> None:
    """Engine-vs-trainer logprob mismatch after a resume: fp32 rounding noise in both runs, not equal between them
    (requests reach the two engines in batches that depend on timing, and a batch's size changes the CPU matmul's
    rounding: 7e-7 vs 2.1e-6 seen for the same step)."""
    for row in (resumed, original):
        assert row["mismatch/logprob_abs_diff_max"] <= 1e-4


@pytest.mark.slow
def test_rl_loop_tp2_with_r3_and_resume(tmp_path):
    """TP2 (+SP), DP1: 3 steps with a checkpoint after step 2; a run resumed from that checkpoint (per-rank model
    + optimizer state, data position) makes the same step 3 as the uninterrupted run."""
    ck = tmp_path / "ck"
    rows = _train(
        tmp_path / "full",
        "--tensor-model-parallel-size",
        "2",
        "--num-rollout",
        "3",
        "--save-interval",
        "2",
        "--save",
        str(ck),
    )
    _check_rl_rows(rows, [1, 2, 3])
    listing = sorted(p.name for p in (ck / "step_000002").iterdir())
    assert listing == ["manifest.json", "rank0", "rank1", "state.json"]
    (ck / "latest").write_text("step_000002")
    resumed = _train(
        tmp_path / "resumed",
        "--tensor-model-parallel-size",
        "2",
        "--num-rollout",
        "3",
        "--load",
        str(ck),
        "--save",
        str(tmp_path / "ck2"),
    )
    assert [r["step"] for r in resumed] == [3]
    for key in ("rollout/reward_mean", "rollout/response_len_mean", "train/pg_loss", "train/grad_norm"):
        assert resumed[0][key] == pytest.approx(rows[2][key], rel=1e-4, abs=1e-6), key
    _assert_mismatch_noise(resumed[0], rows[2])
    assert resumed[0]["sync/verified"] == 1.0 and resumed[0]["routing/replay_agreement"] == 1.0


@pytest.mark.slow
def test_rl_loop_ep2_with_r3_p2p_sync_and_offloaded_optimizer(tmp_path):
    """EP2, DP2: each rank trains its own shard; the experts' all-to-all spans both. Weight sync by p2p: every
    rank exports (the EP gathers) and writes its planned share; AdamW steps CPU fp32 master copies."""
    rows = _train(
        tmp_path / "run",
        "--expert-model-parallel-size",
        "2",
        "--num-rollout",
        "2",
        "--update-weight-transfer-mode",
        "p2p",
        "--optimizer-cpu-offload",
    )
    _check_rl_rows(rows, [1, 2])


@pytest.mark.slow
def test_rl_loop_pp2_cp2_with_r3_gspo_and_resume(tmp_path):
    """PP2 (uneven: the dense layer alone on stage 0, which then has no router) x CP2 on 4 ranks, GSPO: the last
    stage's CP-rank-0 rank reports; its sequence-level ratio is exact (every CP rank computes the loss over
    the gathered logprobs); each stage replays its routing slice; each stage's lead rank broadcasts its own
    layers through a group of its own (both verified); the KL term's reference model is pipelined too. A run
    resumed from the step-1 checkpoint (one file per rank) makes the same step 2."""
    layout = [
        "--num-trainer-ranks",
        "4",
        "--pipeline-model-parallel-size",
        "2",
        "--context-parallel-size",
        "2",
        "--decoder-first-pipeline-num-layers",
        "1",
        "--advantage-estimator",
        "gspo",
        "--num-rollout",
        "2",
        "--kl-loss-coef",
        "0.01",
    ]
    ck = tmp_path / "ck"
    rows = _train(tmp_path / "full", *layout, "--save-interval", "1", "--save", str(ck))
    _check_rl_rows(rows, [1, 2])
    assert [r["sync/sources"] for r in rows] == [2.0, 2.0]  # one sender per pipeline stage
    assert rows[0]["sync/tensors"] == _hf_tensors_without_mtp()  # each once (no MTP layer: no stage shares one)
    # the reference model runs through the same pipeline: equal to the policy at step 1, apart after a step
    assert rows[0]["train/kl_loss"] == pytest.approx(0.0, abs=1e-7) and rows[1]["train/kl_loss"] > 1e-7
    listing = sorted(p.name for p in (ck / "step_000001").iterdir())
    assert listing == ["manifest.json"] + [f"rank{r}" for r in range(4)] + ["state.json"]
    (ck / "latest").write_text("step_000001")
    resumed = _train(tmp_path / "resumed", *layout, "--load", str(ck), "--save", str(tmp_path / "ck2"))
    assert [r["step"] for r in resumed] == [2]
    for key in ("rollout/reward_mean", "train/pg_loss", "train/grad_norm"):
        assert resumed[0][key] == pytest.approx(rows[1][key], rel=1e-4, abs=1e-6), key
    _assert_mismatch_noise(resumed[0], rows[1])
    assert resumed[0]["sync/verified"] == 1.0 and resumed[0]["routing/replay_agreement"] == 1.0


# -- MTP training -----------------------------------------------------------------------------------------------
def _mtp_worker(rank: int, store: str, out_path: str) -> None:
    """One gloo process: the same R3 training step with and without --enable-mtp-training (lr 0: only the
    gradients matter); returns both backends' gradients and the MTP metrics."""
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    import torch.distributed as dist

    from glm_rl.config import AlgoConfig, MegatronConfig, ModelConfig, TrainConfig
    from glm_rl.trainer.backends.megatron.backend import MegatronBackend

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=1)
    try:
        out = {}
        for mtp in (False, True):
            # clipping off: one norm over all parameters (MTP included, as megatron's) would couple the two
            train = TrainConfig(backend="megatron", num_trainer_ranks=1, lr=0.0, clip_grad=1e9)
            b = MegatronBackend(
                ModelConfig(),
                train,
                AlgoConfig(use_rollout_routing_replay=True),
                megatron_cfg=MegatronConfig(enable_mtp_training=mtp),
                temperature=1.0,
            )
            samples = make_samples(8)
            res = b.logprobs(samples)
            for s in samples:
                s.old_logprobs = res["old"][s.index] + 0.01
            metrics = b.train_step(samples, float(sum(s.token_mask.sum() for s in samples)))
            grads = {n: p.grad.clone() for n, p in b.model.named_parameters()}
            out[mtp] = {"grads": grads, "metrics": metrics, "exported": sorted(n for n, _ in b.named_tensors())}
            from megatron.core import parallel_state as ps

            ps.destroy_model_parallel()  # the next backend builds the parallel state afresh
        torch.save(out, out_path)
    finally:
        dist.destroy_process_group()


def test_mtp_training_leaves_backbone_gradients_unchanged(tmp_path):
    import torch.multiprocessing as mp

    out_path = tmp_path / "mtp.pt"
    mp.spawn(_mtp_worker, args=(str(tmp_path / "store"), str(out_path)), nprocs=1, join=True)
    r = torch.load(out_path, weights_only=False)
    plain, mtp = r[False], r[True]
    mtp_params = [n for n in mtp["grads"] if n.startswith("mtp.")]
    assert mtp_params and set(plain["grads"]) == set(mtp["grads"]) - set(mtp_params)
    for n, g in plain["grads"].items():  # the MTP loss reaches no backbone, embedding or LM-head parameter
        assert torch.equal(g, mtp["grads"][n]), n
    assert sum(float(mtp["grads"][n].abs().sum()) for n in mtp_params) > 1e-3  # and does train the MTP layer
    m = mtp["metrics"]
    assert 0 < m["train/mtp_loss"] < 10 and 0 <= m["train/mtp_accuracy"] <= 1
    assert "train/mtp_loss" not in plain["metrics"]
    assert {n for n in mtp["exported"] if n.startswith("model.layers.4.")}  # weight sync carries the MTP layer
    assert not {n for n in plain["exported"] if n.startswith("model.layers.4.")}


@pytest.mark.slow
def test_rl_loop_with_mtp_training_syncs_the_mtp_layer(tmp_path):
    """`--enable-mtp --enable-mtp-training`: engines draft with the MTP layer, the trainer trains it on rollout
    tokens, and every sync (MTP tensors included) verifies bitwise."""
    rows = _train(tmp_path, "--num-trainer-ranks", "1", "--enable-mtp", "--enable-mtp-training", "--num-rollout", "2")
    _check_rl_rows(rows, [1, 2])
    for r in rows:
        assert r["sync/verified"] == 1.0 and r["routing/replay_agreement"] == 1.0
        assert 0 < r["train/mtp_loss"] < 10 and r["rollout/spec_accept_length"] >= 1.0
