"""Where a large decode batch's time goes in the embedded engine (issue 25 item 3: in-loop decode at batch 511
ran at ~16k tok/s while batch 64 reaches 26k tok/s).

    python benchmarks/engine_batch_profile.py --device cuda                      # the 1.06 B model, batch 64 and 512
    python benchmarks/engine_batch_profile.py --device cpu --batch-sizes 4,8 --new-tokens 8 \
        --random-model hidden=64,layers=2,experts=4,top_k=2,ffn=32,vocab=512,heads=2,kv_heads=1,dense_ffn=128

Per batch size, with and without routed experts (R3), after an untimed run that captures the graphs:
- `batch_s`: `run_batch` wall time (what the engine's scheduler spends on the batch), and its tok/s;
- `prefill_s`: the prompt forward alone; `step_gpu_ms`: one graphed sampled decode step replayed back to back at
  this batch (pure device time); `loop_overhead_s` = batch - prefill - steps x step: what the host loop adds
  beyond the device's work (bookkeeping not hidden behind the queued step, compaction, captures);
- `r3_answer_s`: building every row's routed-experts answer (what `EmbeddedEngine._response` does per row).
Then a torch.profiler table of the largest batch (top device kernels and host ops). Writes JSON to `--out`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_decode import DTYPES, random_model, sync  # noqa: E402

from glm_rl.engine import routed_experts  # noqa: E402
from glm_rl.engine.batch import GenerationRequest, SamplingParams  # noqa: E402
from glm_rl.engine.decode import run_batch  # noqa: E402
from glm_rl.engine.decode.static import StaticDecoder  # noqa: E402


def requests_for(n: int, prompt_len: int, vocab: int, sampling: SamplingParams, routed: bool):
    g = torch.Generator().manual_seed(n)
    return [
        GenerationRequest(
            rid=str(i),
            input_ids=tuple(torch.randint(1, vocab, (prompt_len + i % 16,), generator=g).tolist()),
            sampling=sampling,
            seed=i,
            return_routed_experts=routed,
        )
        for i in range(n)
    ]


def timed(fn, device: str) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def step_gpu_ms(decoder: StaticDecoder, n: int, pos: int, sampling: SamplingParams, repeats: int = 20) -> float:
    """One sampled decode step at batch n, position `pos`, replayed back to back: ms per step."""
    tokens = torch.ones(n, dtype=torch.long, device=decoder.device)
    bits = list(range(n))
    decoder.decode_sampled(tokens, [pos] * n, bits, sampling)  # captured already, or captures now
    sync(decoder.device.type)
    t0 = time.perf_counter()
    for _ in range(repeats):
        decoder.decode_sampled(tokens, [pos] * n, bits, sampling)
    sync(decoder.device.type)
    return (time.perf_counter() - t0) / repeats * 1e3


def profile_table(fn, device: str, rows: int = 25) -> dict[str, str]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        sync(device)
    avg = prof.key_averages()
    out = {"host": avg.table(sort_by="self_cpu_time_total", row_limit=rows)}
    if device == "cuda":
        out["device"] = avg.table(sort_by="self_cuda_time_total", row_limit=rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--random-model", default="default")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    ap.add_argument("--batch-sizes", default="64,512", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_batch_profile.json"))
    args = ap.parse_args()
    dtype = DTYPES[args.dtype or ("bfloat16" if args.device == "cuda" else "float32")]
    model, _, _ = random_model(args.random_model, dtype, args.device)
    vocab = model.config.vocab_size
    decoder = StaticDecoder(model, max_batch=max(args.batch_sizes), cuda_graph=args.device == "cuda")
    sampling = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, ignore_eos=True)
    common = dict(eos_ids=[], pad_id=0, gates=[], should_abort=lambda: False, decoder=decoder)
    results = []
    for n in args.batch_sizes:
        for routed in (False, True):
            reqs = requests_for(n, args.prompt_len, vocab, sampling, routed)
            first, _ = timed(lambda: run_batch(model, reqs, **common), args.device)  # captures graphs
            batch_s, rows = timed(lambda: run_batch(model, reqs, **common), args.device)
            prefill_s, _ = timed(lambda: decoder.prefill([r.input_ids for r in reqs], 0), args.device)
            step = step_gpu_ms(decoder, n, args.prompt_len + args.new_tokens // 2, sampling)
            r3_s = 0.0
            if routed:
                r3_s, _ = timed(
                    lambda: [routed_experts.encode(torch.cat(r.routed).sort(dim=-1).values) for r in rows], args.device
                )
            overhead = batch_s - prefill_s - (args.new_tokens - 1) * step / 1e3
            results.append(
                {
                    "batch": n,
                    "routed_experts": routed,
                    "first_run_s": round(first, 4),
                    "batch_s": round(batch_s, 4),
                    "tok_s": round(n * args.new_tokens / batch_s),
                    "prefill_s": round(prefill_s, 4),
                    "step_gpu_ms": round(step, 3),
                    "device_bound_tok_s": round(n / step * 1e3),
                    "loop_overhead_s": round(overhead, 4),
                    "r3_answer_s": round(r3_s, 4),
                }
            )
            print(json.dumps(results[-1]), flush=True)
    keys = list(results[0])
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in results:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    profiles = {}
    if not args.no_profile:
        n = max(args.batch_sizes)
        reqs = requests_for(n, args.prompt_len, vocab, sampling, True)
        profiles = profile_table(lambda: run_batch(model, reqs, **common), args.device)
        for name, table in profiles.items():
            print(f"\n## {name} ops, batch {n} with routed experts\n{table}")
    meta = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "model": args.random_model,
        "dtype": str(dtype),
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results, "profiles": profiles}, indent=1))


if __name__ == "__main__":
    main()
