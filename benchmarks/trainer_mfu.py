"""Training throughput and MFU: the Megatron backend's model vs the torch backend's, same batch, one GPU.

    python benchmarks/trainer_mfu.py                          # GPU box: 1.06 B GLM-4.5-shaped model, bf16
    python benchmarks/trainer_mfu.py --random-model hidden=256,layers=2,experts=8,top_k=2,ffn=128,vocab=1024 \
        --batch 2 --seq 256 --device cpu --dtype float32      # a smoke run anywhere

One optimizer step = forward, per-token log-probabilities of the next token, mean loss, backward, AdamW step,
on `--batch` × `--seq` random tokens. Arms (each on the same random-init weights' shape and the same batch):
- `torch`: HF `Glm4MoeForCausalLM` as `TorchBackend` runs it (SDPA attention, transformers' default grouped-mm
  experts, logits → fp32 log_softmax → gather).
- `megatron`: megatron-core `GPTModel` as the Megatron backend builds it (`build_gpt_model(fast=True)`:
  grouped-GEMM experts and SDPA attention in the local spec), loss from its vocab-parallel cross entropy.
  Log-probabilities through `logprobs.vocab_parallel_logprobs` (chunked, compiled on CUDA), as the backend does.
- `megatron-compiled`: `megatron` with regional `torch.compile` of each decoder layer
  (`fast_modules.compile_decoder_layers`: `layer.compile(dynamic=False)`, same parameters; the token dispatcher's
  host-sync steps stay eager). Compilation happens in the warm-up steps (mostly the first; a few guards, e.g. the
  dispatcher's sync point, recompile once in the second: keep `--warmup` ≥ 2), so timed steps exclude it; its cost
  is recorded as `compile_s` = warm-up time − warm-up steps × the median timed step. On CPU dynamo is re-enabled for
  this arm only (the CPU shims turn it off).
- `megatron-mce`: the same model with megatron's own cross entropy (`labels=`: fp32 upcast of the logits).
- `megatron-local`: megatron's local spec unchanged (per-expert loop, unfused attention) and its cross entropy.
Both use bf16 parameters and `torch.optim.AdamW(fused=True)` on CUDA; the model differs, the work does not.

MFU = model FLOPs / step time / peak, model FLOPs = 6 × N × tokens + attention, where N counts the parameters a
token passes through, embeddings excluded and the LM head included (attention, dense and shared-expert MLPs,
the top-k routed experts, router), and attention = 3 (fwd + bwd) × 2 matmuls × 2 × b × s² × heads × head_dim / 2
(causal) per layer. Peak defaults to the H100 SXM dense bf16 figure, 989 TFLOP/s (`--peak-tflops`).
Prints a table; writes JSON to `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_decode import DTYPES, random_spec  # noqa: E402

from glm_rl.models.glm45.presets import ModelSpec  # noqa: E402


def model_flops(spec: ModelSpec, batch: int, seq: int) -> float:
    n = spec.param_counts()["active_params"] + spec.vocab_size * spec.hidden_size  # + LM head
    attention = 3 * 2 * 2 * batch * seq * seq * spec.num_attention_heads * spec.head_dim / 2 * spec.num_hidden_layers
    return 6 * n * batch * seq + attention


def torch_arm(spec: ModelSpec, dtype, device):
    from transformers import Glm4MoeForCausalLM

    with torch.device(device):
        model = Glm4MoeForCausalLM(spec.to_hf_config(pad_token_id=0)).to(dtype)
    model.train()

    def loss_fn(ids, targets):
        logits = model(input_ids=ids, use_cache=False).logits.float()
        return -torch.gather(F.log_softmax(logits, -1), -1, targets[..., None]).mean()

    return model, loss_fn


def megatron_arm(spec: ModelSpec, dtype, device, fast: bool, fused_logprobs: bool):
    from glm_rl.trainer.backends.megatron.model import build_gpt_model
    from glm_rl.trainer.logprobs import vocab_parallel_logprobs

    on_gpu = device.startswith("cuda")
    model = build_gpt_model(spec, params_dtype=dtype, fast=fast, use_cpu_initialization=not on_gpu)
    model.to(device).train()

    def loss_fn(ids, targets):
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        if not fused_logprobs:
            return model(ids, pos, attention_mask=None, labels=targets).mean()  # megatron's vocab-parallel CE
        logp, _ = vocab_parallel_logprobs(model(ids, pos, attention_mask=None), targets)
        return -logp.mean()

    return model, loss_fn


def megatron_compiled_arm(spec: ModelSpec, dtype, device):
    from glm_rl.trainer.backends.megatron.fast_modules import compile_decoder_layers

    model, loss_fn = megatron_arm(spec, dtype, device, fast=True, fused_logprobs=True)
    compile_decoder_layers(model)
    return model, loss_fn


def init_megatron(device: str) -> None:
    import torch.distributed as dist

    from glm_rl.trainer.backends.megatron.model import setup_model_parallel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=0, world_size=1)
    setup_model_parallel()


def measure(name, build, args, spec, device) -> dict:
    torch.manual_seed(0)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, loss_fn = build()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.startswith("cuda"))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
    inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def step() -> float:
        opt.zero_grad(set_to_none=True)  # noqa: F821 - bound below, before the first call
        loss = loss_fn(inputs, targets)
        loss.backward()
        opt.step()  # noqa: F821
        return float(loss)

    step_s, losses = [], []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        losses.append(step())
        sync(device)
        step_s.append(time.perf_counter() - t0)
        print(f"  {name} step {i + 1}/{args.warmup + args.steps}: {step_s[-1]:.3f} s loss {losses[-1]:.3f}", flush=True)
    times, loss = step_s[args.warmup :], losses[-1]
    best = sorted(times)[len(times) // 2]  # median of the timed steps
    tokens = args.batch * args.seq
    out = {
        "arm": name,
        "step_s": best,
        "tokens_per_s": tokens / best,
        "loss": loss,
        "mfu": model_flops(spec, args.batch, args.seq) / best / (args.peak_tflops * 1e12),
        "first_loss": losses[0],
        "warmup_s": sum(step_s[: args.warmup]),
    }
    if name.endswith("-compiled"):  # warm-up time beyond steady state: dynamo + inductor, forward and backward
        out["compile_s"] = out["warmup_s"] - args.warmup * best
    if device.startswith("cuda"):
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model, opt
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--random-model", default="default", help="'default' or k=v,... (see engine_decode.py)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--arms", default="torch,megatron,megatron-compiled,megatron-mce,megatron-local")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--out", default="benchmarks/results/trainer_mfu.json")
    args = p.parse_args()
    spec, dtype, device = random_spec(args.random_model), DTYPES[args.dtype], args.device
    init_megatron(device)
    builders = {
        "torch": lambda: torch_arm(spec, dtype, device),
        "megatron": lambda: megatron_arm(spec, dtype, device, fast=True, fused_logprobs=True),
        "megatron-compiled": lambda: megatron_compiled_arm(spec, dtype, device),
        "megatron-mce": lambda: megatron_arm(spec, dtype, device, fast=True, fused_logprobs=False),
        "megatron-local": lambda: megatron_arm(spec, dtype, device, fast=False, fused_logprobs=False),
    }
    rows = []
    for arm in args.arms.split(","):
        # the CPU shims disable dynamo process-wide; the compiled arm needs it back (a no-op on GPU)
        with torch._dynamo.config.patch(disable=False) if arm.endswith("-compiled") else contextlib.nullcontext():
            rows.append(measure(arm, builders[arm], args, spec, device))
    base = next((r for r in rows if r["arm"] == "torch"), rows[0])
    print(f"\n{'arm':<16}{'step s':>9}{'tokens/s':>12}{'MFU':>8}{'vs torch':>10}")
    for r in rows:
        r["vs_torch"] = r["tokens_per_s"] / base["tokens_per_s"]
        print(f"{r['arm']:<16}{r['step_s']:>9.3f}{r['tokens_per_s']:>12.0f}{r['mfu']:>8.1%}{r['vs_torch']:>9.2f}×")
    info = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": spec.summary(),
        "batch": args.batch,
        "seq": args.seq,
        "dtype": args.dtype,
        "flops_per_step": model_flops(spec, args.batch, args.seq),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
