"""GPU checks (run on the GPU box: `python -m pytest -q -m gpu tests/test_gpu.py`); skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from glm_rl.config import AlgoConfig, ModelConfig, TrainConfig
from glm_rl.engine.batch import GenerationRequest, SamplingParams
from glm_rl.engine.decode import run_batch
from glm_rl.evaluate import chat_prompt_ids
from glm_rl.models.glm45.checkpoint import load_hf_model
from glm_rl.models.glm45.presets import TINY_CHECKPOINT
from glm_rl.weights.wire import deserialize_named_tensors, serialize_named_tensors, tensor_checksum

pytestmark = pytest.mark.gpu


def test_engine_greedy_on_cuda_matches_hf_generate():
    model, tok = load_hf_model(TINY_CHECKPOINT, dtype=torch.float32)
    model.to("cuda")
    prompts = [chat_prompt_ids(tok, p) for p in ("12+34", "507+88", "9+9")]
    reqs = [
        GenerationRequest(
            rid=str(i), input_ids=tuple(p), sampling=SamplingParams(temperature=0.0, max_new_tokens=12), seed=0
        )
        for i, p in enumerate(prompts)
    ]
    rows = run_batch(
        model,
        reqs,
        eos_ids=model.generation_config.eos_token_id,
        pad_id=tok.pad_token_id,
        gates=[],
        should_abort=lambda: False,
    )
    for p, row in zip(prompts, rows):
        ref = model.generate(
            torch.tensor([p], device="cuda"),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=model.generation_config.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        assert row.output_ids == ref[0, len(p) :].tolist()


def _receive(payload, queue):
    queue.put({n: tensor_checksum(t) for n, t in deserialize_named_tensors(payload)})


def test_cuda_ipc_weights_arrive_bitwise():
    """The colocated `tensor` transport's wire format: CUDA tensors travel as IPC handles, no copy."""
    named = [(f"w{i}", torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)) for i in range(4)]
    payload = serialize_named_tensors(named)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_receive, args=(payload, queue))
    proc.start()
    got = queue.get(timeout=120)
    proc.join(timeout=60)
    assert got == {n: tensor_checksum(t) for n, t in named}


def test_torch_backend_bf16_step_on_cuda_tracks_fp32_cpu():
    from test_trainer_backend import global_tokens, make_samples  # tests/ is on sys.path under pytest

    from glm_rl.trainer.backends.torch_backend import TorchBackend

    samples = make_samples(8)
    algo = AlgoConfig(use_rollout_routing_replay=True)
    cpu = TorchBackend(ModelConfig(), TrainConfig(), algo, temperature=1.0)
    gpu = TorchBackend(ModelConfig(dtype="bfloat16"), TrainConfig(), algo, temperature=1.0, device="cuda")
    ref, out = cpu.logprobs(samples), gpu.logprobs(samples)
    diff = torch.cat([torch.as_tensor(abs(ref["old"][i] - out["old"][i])) for i in ref["old"]])
    # bf16 keeps 8 mantissa bits (~0.4 % per op); these random targets have logprobs near -7, so a few
    # hundredths on average and a few tenths at worst (CPU bf16 measured 0.04 / 0.26)
    assert diff.mean() < 0.1 and diff.max() < 1.0, (float(diff.mean()), float(diff.max()))
    assert out["replay_total"] > 0
    m = gpu.train_step(samples, global_tokens(samples))
    assert torch.isfinite(torch.tensor(m["train/grad_norm"]))


def _megatron_cuda_worker(rank: int, store: str, queue) -> None:
    """One NCCL process: the tiny checkpoint in megatron-core on CUDA (local spec and fast spec), bf16 and fp32."""
    import torch.distributed as dist

    from glm_rl.models.glm45.presets import glm45_tiny
    from glm_rl.trainer.backends.megatron.bridge import import_hf_weights
    from glm_rl.trainer.backends.megatron.model import build_gpt_model, setup_model_parallel

    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
    setup_model_parallel()
    spec = glm45_tiny()
    hf, tok = load_hf_model(TINY_CHECKPOINT, dtype=torch.float32)
    ids = torch.tensor([chat_prompt_ids(tok, p) for p in ("12+34", "50+88", "91+99")], device="cuda")  # same length
    with torch.no_grad():
        ref = hf.to("cuda")(ids).logits
    pos = torch.arange(ids.shape[1], device="cuda").expand_as(ids)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for fast in (False, True):
            model = build_gpt_model(spec, params_dtype=dtype, fast=fast)
            import_hf_weights(model, spec, hf.state_dict())
            with torch.no_grad():
                logits = model.to("cuda").eval()(ids, pos, attention_mask=None)[..., : spec.vocab_size].float()
            out[(str(dtype), fast)] = (logits - ref).abs().max().item()
    out["scale"] = ref.abs().max().item()
    dist.destroy_process_group()
    queue.put(out)


def test_megatron_on_cuda_matches_hf(tmp_path):
    """Megatron backend model on the GPU: fp32 within 1e-4 of HF (as on CPU); bf16 within 2 % of the logit
    scale — bf16 keeps 8 mantissa bits (relative step 2⁻⁸ ≈ 0.4 %) and the error compounds over 4 layers."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_megatron_cuda_worker, args=(0, str(tmp_path / "store"), queue))
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == 0 and not queue.empty(), f"worker exit code {proc.exitcode} (its traceback is above)"
    out = queue.get()
    print(out)
    for fast in (False, True):
        assert out[("torch.float32", fast)] <= 1e-4, out
        assert out[("torch.bfloat16", fast)] <= 0.02 * out["scale"], out


def _megatron_backend_worker(store: str, queue) -> None:
    """One NCCL process: MegatronBackend (fast modules, chunked compiled logprobs) in bf16 on CUDA vs the torch
    backend in fp32 on the CPU, R3 on; then one training step."""
    import torch.distributed as dist
    from test_trainer_backend import global_tokens, make_samples

    from glm_rl.trainer.backends.megatron.backend import MegatronBackend
    from glm_rl.trainer.backends.torch_backend import TorchBackend

    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
    samples = make_samples(8)
    algo = AlgoConfig(use_rollout_routing_replay=True)
    ref = TorchBackend(ModelConfig(), TrainConfig(), algo, temperature=1.0).logprobs(samples)
    gpu = MegatronBackend(
        ModelConfig(dtype="bfloat16"),
        TrainConfig(backend="megatron", num_trainer_ranks=1),
        algo,
        temperature=1.0,
        device="cuda",
    )
    out = gpu.logprobs(samples)
    diff = torch.cat([torch.as_tensor(abs(ref["old"][i] - out["old"][i])) for i in ref["old"]])
    m = gpu.train_step(samples, global_tokens(samples))
    dist.destroy_process_group()
    queue.put(
        {
            "mean": float(diff.mean()),
            "max": float(diff.max()),
            "agree": out["replay_agree"],
            "total": out["replay_total"],
            "grad_norm": m["train/grad_norm"],
        }
    )


def test_megatron_backend_bf16_on_cuda_tracks_fp32_cpu(tmp_path):
    """The RL loop's Megatron backend on the GPU: bf16 logprobs within the bf16 band the torch backend's own
    test uses (mean < 0.1, max < 1.0), R3 replay applied, a finite training step. (`make_samples` carries random
    routing, so replay agreement is at chance level here; the CPU e2e tests check agreement == 1.0.)"""
    import sys

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))  # the child imports test helpers
    proc = ctx.Process(target=_megatron_backend_worker, args=(str(tmp_path / "store"), queue))
    proc.start()
    proc.join(timeout=400)
    assert proc.exitcode == 0 and not queue.empty(), f"worker exit code {proc.exitcode} (its traceback is above)"
    out = queue.get()
    print(out)
    assert out["mean"] < 0.1 and out["max"] < 1.0, out
    assert out["total"] > 0, out
    assert torch.isfinite(torch.tensor(out["grad_norm"]))


def _static_requests(n: int, ignore_eos: bool, one_group: bool = False) -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(n)
    out = []
    for i in range(n):
        ids = tuple(torch.randint(0, 32, (int(torch.randint(1, 14, (1,), generator=g)),), generator=g).tolist())
        sp = SamplingParams(
            temperature=0.0 if i % 2 and not one_group else 1.0,
            ignore_eos=ignore_eos,
            max_new_tokens=40 if ignore_eos else 10 + 3 * i,
        )
        out.append(GenerationRequest(f"r{i}", ids, sp, seed=i, return_logprob=True, return_routed_experts=True))
    return out


def _run_static(model, requests, decoder=None):
    gates = [layer.mlp.gate for i, layer in enumerate(model.model.layers) if i >= model.config.first_k_dense_replace]
    eos = model.generation_config.eos_token_id
    return run_batch(
        model,
        requests,
        eos_ids=[eos] if isinstance(eos, int) else eos,
        pad_id=0,
        gates=gates,
        should_abort=lambda: False,
        decoder=decoder,
    )


@pytest.mark.parametrize(
    "dtype,one_group",
    [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
    ids=["fp32", "bf16", "bf16-one-group"],
)
def test_static_decode_cuda_graphs_match_eager_and_dynamic_cache(dtype, one_group):
    """bf16: CUDA-graphed decode steps == the same decoder without graphs; fp32 (graphs off: the experts' grouped
    GEMM synchronises there) the static cache == HF's DynamicCache path.
    fp32: rows finish at different steps (compaction, several batch buckets), logprobs <= 1e-4. bf16: 8 rows
    that never stop, so graph and eager run the same shapes: tokens equal, logprobs <= 1e-3. one_group: every
    row samples alike, so the sampler runs inside the graph ("sampled" steps)."""
    from glm_rl.engine.decode.static import StaticDecoder

    model = load_hf_model(TINY_CHECKPOINT, dtype=dtype)[0].to("cuda")
    requests = _static_requests(
        11 if dtype == torch.float32 else 8, ignore_eos=dtype == torch.bfloat16, one_group=one_group
    )
    graphed = StaticDecoder(model, max_batch=16)
    runs = {
        "graph": _run_static(model, requests, graphed),
        "eager": _run_static(model, requests, StaticDecoder(model, max_batch=16, cuda_graph=False)),
    }
    if dtype == torch.float32:
        runs["dynamic"] = _run_static(model, requests)
    # graphs run in bf16 (torch's grouped GEMM without host sync); fp32 keeps the static cache, eagerly
    assert bool(graphed.graphs.captured) == (dtype == torch.bfloat16)
    captured = graphed.graphs.captured
    assert {key[0] for key in captured} == ({"sampled"} if one_group else {"decode"} if captured else set())
    tol = 1e-4 if dtype == torch.float32 else 1e-3
    for name, rows in runs.items():
        for a, b in zip(runs["graph"], rows):
            assert a.output_ids == b.output_ids, (name, a.req.rid)
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= tol, (name, a.req.rid)
            assert torch.equal(torch.cat(a.routed).sort(-1).values.cpu(), torch.cat(b.routed).sort(-1).values.cpu())


def test_embedded_engine_on_cuda_answers_like_hf_generate():
    """EmbeddedEngine(device="cuda") over HTTP, greedy: HF generate's tokens; weights update on the GPU."""
    pytest.importorskip("aiohttp")  # the engine's HTTP server
    from glm_rl.engine import EmbeddedEngine, EngineConfig
    from glm_rl.rollout.engine_client import EngineClient

    model, tok = load_hf_model(TINY_CHECKPOINT, dtype=torch.float32)
    model.to("cuda")
    prompt = chat_prompt_ids(tok, "12+34")
    ref = model.generate(
        torch.tensor([prompt], device="cuda"),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=model.generation_config.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    engine = EmbeddedEngine(EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT), device="cuda"))
    client = EngineClient(engine.start(), timeout=120)
    try:
        out = client.generate(input_ids=prompt, sampling_params={"temperature": 0.0, "max_new_tokens": 12})
        assert out["output_ids"] == ref[0, len(prompt) :].tolist()
        name, weight = "lm_head.weight", model.lm_head.weight.detach().cpu() * 0.5
        engine.weights.load([(name, weight)], weight_version=7)
        assert engine.weights.checksums([name])["checksums"][name] == tensor_checksum(weight)
        assert engine.model.lm_head.weight.device.type == "cuda"
    finally:
        engine.shutdown()


def test_compiled_decode_step_tracks_eager_in_bf16():
    """--enable-torch-compile: one graphed decode step of the compiled decoder vs the eager static decoder after the
    same prefill (bf16; fusion changes rounding): logits within 2 % of their scale, same greedy tokens."""
    from glm_rl.engine.decode.static import StaticDecoder

    model = load_hf_model(TINY_CHECKPOINT, dtype=torch.bfloat16)[0].to("cuda")
    prompts = [tuple(range(1, 3 + i)) for i in range(5)]
    out = []
    for decoder in (
        StaticDecoder(model, max_batch=8, cuda_graph=False),
        StaticDecoder(model, max_batch=8, torch_compile=True),
    ):
        decoder.reserve(32)
        logits, _ = decoder.prefill(prompts, pad_id=0)
        step, _ = decoder.decode(logits.argmax(-1).tolist(), [len(p) for p in prompts])
        out.append(step.float().clone())
    assert decoder.compiled and decoder.graphs.captured
    scale = out[0].abs().max()
    assert (out[1] - out[0]).abs().max() <= 0.02 * scale
    assert torch.equal(out[1].argmax(-1), out[0].argmax(-1))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (issue 8: a multi-GPU box)")
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "layout", [dict(tp=2), dict(ep=2), dict(pp=2, first_stage_layers=1)], ids=["tp2", "ep2", "pp2"]
)
def test_megatron_parity_over_nccl(tmp_path, layout, bf16):
    """The CPU parity cases of tests/test_megatron_model.py on 2 GPUs over NCCL: last-stage logits within 1e-4 of
    HF's fp32 logits (CPU) in fp32, within 2 % of their scale in bf16 (the single-GPU bf16 bound: 8 mantissa bits,
    error compounding over 4 layers); every rank's export bitwise equal to the checkpoint (cast to bf16)."""
    from test_megatron_model import _Case, _check_parity_and_export, _run

    results = _run(tmp_path, _Case(device="cuda", bf16=bf16, **layout))
    _check_parity_and_export(results, rel_bound=0.02 if bf16 else None)


def test_colocated_rl_loop_saves_and_resumes_on_cuda(tmp_path):
    """Issue 20: the colocated GPU loop as users run it (tiny model, bf16, `tensor` sync, R3), 10 steps with a
    checkpoint at step 5 and at the end, then a resumed run that continues from step 10 — the run that crashed
    at save on an H100 before (a flat weight buffer holding bf16 and fp32 views)."""
    import json
    import subprocess
    import sys

    flags = [
        "--colocate",
        "--num-engines",
        "1",
        "--num-trainer-ranks",
        "1",
        "--update-weight-transfer-mode",
        "tensor",
        "--dtype",
        "bfloat16",
        "--rollout-batch-size",
        "8",
        "--n-samples-per-prompt",
        "8",
        "--no-report",
        "--save",
        str(tmp_path / "ck"),
    ]

    def run(*extra):
        cmd = [sys.executable, "-m", "glm_rl.cli", "train", "--output-dir", str(tmp_path / "out"), *flags, *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]

    rows = run("--num-rollout", "10", "--save-interval", "5")
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert all(r["sync/verified"] == 1.0 for r in rows)
    assert all(r["routing/replay_agreement"] > 0.9 for r in rows)  # bf16: near, not exact
    assert (tmp_path / "ck" / "latest").read_text().strip().endswith("10")
    resumed = run("--num-rollout", "12", "--load", str(tmp_path / "ck"))
    assert [r["step"] for r in resumed][-2:] == [11, 12]  # continues the run
    assert all(r["sync/verified"] == 1.0 for r in resumed[-2:])
    for r in resumed:  # colocation.py: each side lets go of the GPU while the other works
        assert r["memory/trainer_idle_gib"] < r["memory/trainer_active_gib"], r
        assert r["memory/engine_idle_gib"] < r["memory/engine_active_gib"], r
    rewards = [r["rollout/reward_mean"] for r in resumed]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:3]) / 3, rewards  # the loop learns


def test_engine_release_resume_update_answers_like_a_fresh_engine():
    """Issue 20 item 2, engine side: release (weights + KV cache + graphs) frees what the engine held (<= 10 % of
    its reserved memory stays: memory_reserved is per process, so one engine, weights kept on the host); after
    resume + a weight update, greedy outputs equal the fresh engine's token for token (graphs captured again)."""
    pytest.importorskip("aiohttp")
    from glm_rl.engine import EmbeddedEngine, EngineConfig
    from glm_rl.rollout.engine_client import EngineClient

    cfg = EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT), device="cuda", dtype="bfloat16", max_batch_size=64)
    engine = EmbeddedEngine(cfg)
    client = EngineClient(engine.start(), timeout=120)
    _, tok = load_hf_model(TINY_CHECKPOINT, dtype=torch.float32)
    prompts = [chat_prompt_ids(tok, f"{i}+{2 * i}") for i in range(40)]
    greedy = {"temperature": 0.0, "max_new_tokens": 16}
    try:
        fresh = [o["output_ids"] for o in client.generate(input_ids=prompts, sampling_params=greedy)]
        weights = [(k, v.detach().cpu().clone()) for k, v in engine.weights.state.items()]
        active = client.get("/server_info")["memory_reserved_gib"]
        client.release_memory_occupation()
        idle = client.get("/server_info")["memory_reserved_gib"]
        print(f"\nengine memory: active {active:.4f} GiB, released {idle:.4f} GiB")
        assert idle <= 0.1 * active, (idle, active)
        assert client.get("/health_generate") is not None  # answered without generating
        client.resume_memory_occupation(["weights"])
        engine.weights.load(weights, weight_version=1)
        client.resume_memory_occupation(["kv_cache"])
        assert [o["output_ids"] for o in client.generate(input_ids=prompts, sampling_params=greedy)] == fresh
    finally:
        engine.shutdown()


def test_trainer_offload_frees_memory_and_onload_restores_it_bitwise():
    """Issue 20 item 2, trainer side: offload moves weights (the flat buffer) and AdamW state to the host and
    frees the GPU; onload restores them bitwise and the next step equals a twin's that never offloaded."""
    from test_trainer_backend import global_tokens, make_samples

    from glm_rl.trainer.backends.torch_backend import TorchBackend

    samples = make_samples(8)

    def mk():
        return TorchBackend(ModelConfig(dtype="bfloat16"), TrainConfig(), AlgoConfig(), temperature=1.0, device="cuda")

    torch.manual_seed(0)
    a = mk()
    torch.manual_seed(0)
    b = mk()
    for be in (a, b):
        be.flatten_weights()
        be.train_step(samples, global_tokens(samples))
    torch.cuda.synchronize()
    state = {k: v.clone() for k, v in a.model.state_dict().items()}
    active = torch.cuda.memory_reserved()
    moved = a.offload()
    assert moved > 0 and a.is_offloaded()
    a.onload()
    assert all(torch.equal(state[k], v) for k, v in a.model.state_dict().items())
    ma, mb = a.train_step(samples, global_tokens(samples)), b.train_step(samples, global_tokens(samples))
    assert ma["train/grad_norm"] == mb["train/grad_norm"]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    print(f"\ntrainer: moved {moved:.3f} GiB, reserved by both backends {active / 2**30:.3f} GiB")


def test_routed_experts_encode_from_cuda_tensors():
    """Regression (H100, 2026-12-07): the engine's routed experts are CUDA tensors on a GPU; both wire forms
    encoded them with .numpy() and every R3 request failed with a 500."""
    from glm_rl.engine import routed_experts as rx

    ids = torch.randint(0, 64, (5, 3, 8), device="cuda")
    layout = rx.RoutingLayout(num_layers=4, moe_layers=(1, 2, 3), top_k=8)
    assert (rx.decode(rx.encode(ids)) == ids.cpu().numpy()).all()
    assert (rx.decode(rx.encode_sglang(ids, layout), layout) == ids.cpu().numpy()).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs: NCCL refuses two ranks on one device")
def test_broadcast_sync_over_nccl_reaches_an_engine_on_another_gpu_bitwise():
    """Issue 20 item 3: `broadcast` over an NCCL group (the trainer group picks it when engines have GPUs of
    their own): this process is the trainer's source on cuda:0, an engine process on cuda:1 joins with
    backend nccl; the bf16 weights (+10 % so they differ from the checkpoint) arrive bitwise and versioned, and
    the engine still decodes with them."""
    import subprocess
    import sys

    from glm_rl.rollout.engine_client import EngineClient
    from glm_rl.weights.transports import BroadcastTransport

    proc = subprocess.Popen(
        [sys.executable, "-m", "glm_rl.engine", "--hf-checkpoint", str(TINY_CHECKPOINT), "--port", "0"]
        + ["--dtype", "bfloat16", "--device", "cuda:1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY "), line
        client = EngineClient(line.split()[1], timeout=120)
        prompt = [1, 2, 4, 23, 13, 10, 17, 11, 5, 23]
        greedy = {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True}
        before = client.generate(prompt, greedy)["output_ids"]
        model = load_hf_model(TINY_CHECKPOINT, dtype=torch.bfloat16)[0].to("cuda:0")
        named = [(n, (t * 1.1).to(t.dtype)) for n, t in model.state_dict().items()]
        torch.cuda.set_device(0)
        transport = BroadcastTransport([client.url], None, 1 << 20)
        transport.backend = "nccl"
        transport.prepare()
        result = transport.push(named, version=3, verify=True)
        assert result["verified"] and client.weights_checksum()["weight_version"] == 3
        assert len(client.generate(prompt, greedy)["output_ids"]) == len(before)  # it still decodes
        transport.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
