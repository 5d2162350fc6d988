"""Decode throughput of the embedded engine vs HF `generate`, and the MTP speculative-decoding speedup.

    python benchmarks/engine_decode.py                        # tiny checkpoint, CPU, fp32
    python benchmarks/engine_decode.py --random-model default --device cuda --dtype bfloat16   # GPU box
    python benchmarks/engine_decode.py --random-model hidden=1024,layers=8,experts=64,top_k=8,ffn=512

1. Throughput: the same prompts through the engine's generation path (`glm_rl.engine.decode.run_batch`, what
   EmbeddedEngine runs per batch, without HTTP) with its default decoder (static KV cache, CUDA graphs on GPU:
   decode/static.py; graphs are captured in a first untimed run, as an engine does at its first batches, and
   that run's time is reported apart), with HF's DynamicCache path of the same code (`static_kv_cache=False`),
   and through HF `generate`, at each batch size: sampling at
   temperature 1 (no top-k / top-p; HF's default top_k=50 turned off), eos ignored, exactly `--new-tokens`
   tokens per row; tokens/s = batch x new tokens / wall time (prefill included, as a user sees it).
2. MTP at batch 1: prompts one at a time through `run_batch` without and with `mtp` (speculative decoding), both
   over the engine's static-cache decoders
   (temperature `--mtp-temperature`, default greedy, stopping at eos): tokens/s of each, the speedup, the
   acceptance length (completion tokens / verify forwards, SGLang's definition), and the cost of one verify
   step (verify + MTP forward) relative to one plain decode step. Speedup ~= acceptance length / step-cost
   ratio, so `projected_speedup` gives what a trained MTP layer would bring on this model: a random-init
   model's MTP layer predicts nothing (acceptance ~1), its measured speedup says only what drafting costs.

`--random-model` builds a GLM-4.5-shaped random-init model (and a random MTP layer); `default` is the 1.06 B
model FACTS.md's HF baseline used (hidden 1024, 8 layers, 64 experts top-8, FFN 512, vocab 151552).
Prints a table; writes JSON to `--out`.
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
from glm_rl.engine.batch import GenerationRequest, SamplingParams  # noqa: E402
from glm_rl.engine.decode import run_batch  # noqa: E402
from glm_rl.engine.decode.static import StaticDecoder  # noqa: E402
from glm_rl.models.glm45.presets import ASSETS, TINY_CHECKPOINT  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import random_spec  # noqa: E402  (the spec builder the benchmarks share)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def random_model(desc: str, dtype: torch.dtype, device: str):
    """GLM-4.5-shaped random-init model + MTP layer (see `random_spec`)."""
    from transformers import Glm4MoeForCausalLM
    from transformers.modeling_layers import MtpModel

    spec = random_spec(desc)
    torch.manual_seed(0)
    with torch.device(device):
        model = Glm4MoeForCausalLM(spec.to_hf_config(eos_token_id=None, pad_token_id=0, bos_token_id=None))
        mtp = MtpModel(model, 1)
    model.generation_config.eos_token_id = None
    return model.to(dtype).eval(), mtp.to(dtype).eval(), spec.summary()


def tiny_model(path: str, dtype: torch.dtype, device: str):
    from glm_rl.models.glm45.checkpoint import load_hf_model, load_mtp

    model, tokenizer = load_hf_model(path, dtype)
    mtp = load_mtp(model)
    return model.to(device), mtp.to(device), tokenizer


def prompts_for(args, tokenizer, vocab: int, n: int, split: str = "eval", seed: int = 1) -> list[list[int]]:
    """`n` prompts: the tiny task's `split` rows (checkpoint), or random tokens drawn with `seed` (random model).
    The drafter trains on the other split / seed than the measured prompts."""
    if tokenizer is not None:
        from glm_rl.evaluate import chat_prompt_ids

        rows = [json.loads(line) for line in (ASSETS / "arith" / f"{split}.jsonl").read_text().splitlines()]
        return [chat_prompt_ids(tokenizer, rows[i % len(rows)]["prompt"]) for i in range(n)]
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n, args.prompt_len), generator=gen).tolist()


def train_drafter(args, model, mtp, tokenizer, eos) -> dict:
    """Self-distil the MTP layer on greedy continuations of prompts other than the measured ones (random
    prompts of another seed; the checkpoint's train set), 1/8 of the batches (at least one) held out for
    acceptance before / after."""
    from glm_rl.models.glm45.mtp_distill import distill, greedy_batches

    n = args.drafter_prompts
    if n < 2:
        sys.exit(f"--drafter-prompts {n}: need at least 2 (one held out, one to train on)")
    prompts = prompts_for(args, tokenizer, model.config.vocab_size, n, split="train", seed=2)
    t0 = time.time()
    batches = greedy_batches(
        model,
        prompts,
        new_tokens=args.mtp_new_tokens,
        eos_ids=list(eos or []),
        pad_id=0,
        batch_size=min(64, max(1, n // 2)),
    )
    generate_s = time.time() - t0
    held = max(1, len(batches) // 8)
    result = distill(model, mtp, batches[held:], batches[:held], steps=args.train_drafter_steps)
    return result | {"prompts": n, "generate_s": generate_s}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fns: list, device: str, repeats: int) -> list[tuple[float, object]]:
    """Best (minimum) wall seconds of each `fn()` and its last result, over `repeats` rounds after a warm-up
    round; the fns alternate within each round, so drift on a shared machine hits them alike, and the
    minimum is the least disturbed figure."""
    best, results = [float("inf")] * len(fns), [None] * len(fns)
    for round_ in range(repeats + 1):
        for i, fn in enumerate(fns):
            sync(device)
            t0 = time.perf_counter()
            results[i] = fn()
            sync(device)
            if round_:
                best[i] = min(best[i], time.perf_counter() - t0)
    return list(zip(best, results))


def engine_generate(model, prompts, sampling: SamplingParams, eos, mtp=None, num_steps: int = 1, decoder=None):
    requests = [
        GenerationRequest(rid=str(i), input_ids=tuple(p), sampling=sampling, seed=i) for i, p in enumerate(prompts)
    ]
    common = dict(eos_ids=eos, pad_id=0, gates=[], should_abort=lambda: False)
    return run_batch(model, requests, decoder=decoder, mtp=mtp, num_steps=num_steps, **common)


def hf_generate(model, prompts, new_tokens: int):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            pad_token_id=0,
        )


def throughput(args, model, prompts_of, eos) -> list[dict]:
    rows = []
    sampling = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, ignore_eos=True)
    # the engine's default decoder: one per engine, its graphs captured in the warm-up round (as at startup)
    decoder = StaticDecoder(
        model,
        max_batch=max(args.batch_sizes),
        cuda_graph=not args.disable_cuda_graph,
        torch_compile=args.enable_torch_compile,
    )
    for b in args.batch_sizes:
        prompts = prompts_of(b)
        t0 = time.perf_counter()
        engine_generate(model, prompts, sampling, eos, decoder=decoder)  # first use: captures this batch's graphs
        sync(args.device)
        first = time.perf_counter() - t0
        (t_engine, _), (t_dynamic, _), (t_hf, _) = timed(
            [
                lambda: engine_generate(model, prompts, sampling, eos, decoder=decoder),
                lambda: engine_generate(model, prompts, sampling, eos),
                lambda: hf_generate(model, prompts, args.new_tokens),
            ],
            args.device,
            args.repeats,
        )
        tokens = b * args.new_tokens
        rows.append(
            {
                "batch": b,
                "new_tokens": args.new_tokens,
                "engine_tok_s": tokens / t_engine,
                "engine_dynamic_cache_tok_s": tokens / t_dynamic,
                "hf_generate_tok_s": tokens / t_hf,
                "engine_over_hf": t_hf / t_engine,
                "dynamic_cache_over_hf": t_hf / t_dynamic,
                "engine_first_run_s": first,
                "cuda_graphs": len(decoder.graphs.captured),
            }
        )
    return rows


def mtp_speedup(args, model, mtp, prompts, eos) -> dict:
    sampling = SamplingParams(temperature=args.mtp_temperature, max_new_tokens=args.mtp_new_tokens)

    # both over the engine's static-cache decoders (the speculative one also caches the MTP layer)
    graphs, compiled = not args.disable_cuda_graph, args.enable_torch_compile
    decoders = {
        False: StaticDecoder(model, max_batch=1, cuda_graph=graphs, torch_compile=compiled),
        True: StaticDecoder(model, max_batch=1, cuda_graph=graphs, torch_compile=compiled, mtp=mtp),
    }

    def run(use_mtp: bool, params: SamplingParams = sampling):
        out = []
        for p in prompts:  # batch 1
            out += engine_generate(
                model, [p], params, eos, mtp if use_mtp else None, args.num_steps, decoder=decoders[use_mtp]
            )
        return out

    stats = {}
    timings = timed([lambda: run(False), lambda: run(True)], args.device, args.repeats)
    # the prompts' own cost (prefill, and for MTP its pass over the prompt and the first draft): the same runs
    # stopped after the first token; subtracted, what is left is decoding, which MTP is meant to speed up
    first = SamplingParams(temperature=args.mtp_temperature, max_new_tokens=1)
    prefill = timed([lambda: run(False, first), lambda: run(True, first)], args.device, args.repeats)
    for (name, use_mtp), (seconds, rows) in zip((("plain", False), ("mtp", True)), timings):
        tokens = sum(len(r.output_ids) for r in rows)
        stats[name] = {
            "seconds": seconds,
            "tokens": tokens,
            "tok_s": tokens / seconds,
            "forwards": sum(r.verify_ct + 1 for r in rows) if use_mtp else tokens,
        }
    decode_tok_s = [
        (stats[name]["tokens"] - len(prompts)) / (stats[name]["seconds"] - seconds)
        for name, (seconds, _) in zip(("plain", "mtp"), prefill)
    ]
    plain_rows = timings[0][1]
    # greedy: the share of prompts whose MTP output is the plain output (in bf16 a 2-token verify can round a
    # near-tie differently from a 1-token step; in fp32 the tests require all of them)
    same = sum(a.output_ids == b.output_ids for a, b in zip(plain_rows, rows)) / len(rows)
    verify = sum(r.verify_ct for r in rows)
    accept = stats["mtp"]["tokens"] / verify
    # cost of one spec step (verify + MTP) over one plain step: per-forward times
    step_ratio = (stats["mtp"]["seconds"] / stats["mtp"]["forwards"]) / (
        stats["plain"]["seconds"] / stats["plain"]["forwards"]
    )
    return {
        "prompts": len(prompts),
        "temperature": args.mtp_temperature,
        "num_steps": args.num_steps,
        "plain_tok_s": stats["plain"]["tok_s"],
        "mtp_tok_s": stats["mtp"]["tok_s"],
        "speedup": stats["mtp"]["tok_s"] / stats["plain"]["tok_s"],
        "accept_length": accept,
        "decode_only": {
            "plain_tok_s": decode_tok_s[0],
            "mtp_tok_s": decode_tok_s[1],
            "speedup": decode_tok_s[1] / decode_tok_s[0],
            "prefill_s": {"plain": prefill[0][0], "mtp": prefill[1][0]},
        },
        "step_cost_ratio": step_ratio,
        "same_output_share": same if args.mtp_temperature == 0 else None,
        "projected_speedup": {str(a): a / step_ratio for a in (1.7, 2.0, 2.5)},
        "detail": stats,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-checkpoint", default=str(TINY_CHECKPOINT))
    ap.add_argument("--random-model", default=None, help="'default' or hidden=...,layers=...,experts=...,...")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on CUDA, else float32")
    ap.add_argument("--batch-sizes", default="1,16,64", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--new-tokens", type=int, default=None, help="default: 128 (random model), 64 (checkpoint)")
    ap.add_argument("--prompt-len", type=int, default=32, help="random model: random prompt tokens")
    ap.add_argument("--mtp-prompts", type=int, default=None, help="default: 4 (random model), 40 (checkpoint)")
    ap.add_argument("--mtp-new-tokens", type=int, default=None, help="default: --new-tokens")
    ap.add_argument("--mtp-temperature", type=float, default=0.0)
    ap.add_argument("--num-steps", type=int, default=1, help="MTP drafts per verify forward")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per figure (best of), after a warm-up")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--disable-cuda-graph", action="store_true", help="static cache without CUDA graphs")
    ap.add_argument("--enable-torch-compile", action="store_true", help="compile the graphed decode step")
    ap.add_argument(
        "--train-drafter-steps",
        type=int,
        default=0,
        help="first train the MTP layer on the model's own greedy outputs (models/glm45/mtp_distill.py) for "
        "this many steps: a random model's drafter then guesses like a trained one",
    )
    ap.add_argument("--drafter-prompts", type=int, default=512, help="prompts generated from to train the drafter")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_decode.json"))
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype = DTYPES[args.dtype]
    if args.random_model:
        model, mtp, info = random_model(args.random_model, dtype, args.device)
        tokenizer, eos = None, []
        args.new_tokens = args.new_tokens or 128
        args.mtp_prompts = 4 if args.mtp_prompts is None else args.mtp_prompts
    else:
        model, mtp, tokenizer = tiny_model(args.hf_checkpoint, dtype, args.device)
        info = {"checkpoint": args.hf_checkpoint, "params": sum(p.numel() for p in model.parameters())}
        eos = model.generation_config.eos_token_id
        args.new_tokens = args.new_tokens or min(64, model.config.max_position_embeddings - 40)
        args.mtp_prompts = 40 if args.mtp_prompts is None else args.mtp_prompts
    args.mtp_new_tokens = args.mtp_new_tokens or args.new_tokens
    prompts_of = lambda n: prompts_for(args, tokenizer, model.config.vocab_size, n)  # noqa: E731
    device_name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"
    )
    info["attn_implementation"] = model.config._attn_implementation
    info["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    info["engine_decoder"] = (
        "static cache"
        + ("" if args.disable_cuda_graph else " + CUDA graphs")
        + (" + torch.compile" if args.enable_torch_compile else "")
    )
    drafter = train_drafter(args, model, mtp, tokenizer, eos) if args.train_drafter_steps else None
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": device_name,
        "dtype": args.dtype,
        "model": info,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "throughput": [] if args.skip_throughput else throughput(args, model, prompts_of, eos),
        "drafter_training": drafter,
        "mtp_batch1": mtp_speedup(args, model, mtp, prompts_of(args.mtp_prompts), eos) if args.mtp_prompts else None,
    }
    print(f"device {device_name}, {args.dtype}, model {info}")
    print(
        f"{'batch':>6}{'new tok':>9}{'engine tok/s':>14}{'dynamic-cache tok/s':>21}{'HF generate tok/s':>19}"
        f"{'engine / HF':>13}{'dynamic / HF':>14}"
    )
    for r in result["throughput"]:
        print(
            f"{r['batch']:>6}{r['new_tokens']:>9}{r['engine_tok_s']:>14.1f}{r['engine_dynamic_cache_tok_s']:>21.1f}"
            f"{r['hf_generate_tok_s']:>19.1f}{r['engine_over_hf']:>12.2f}x{r['dynamic_cache_over_hf']:>13.2f}x"
        )
    if (d := result["drafter_training"]) is not None:
        print(
            f"drafter trained {args.train_drafter_steps} steps on {d['prompts']} prompts' greedy outputs in "
            f"{d['seconds']:.0f} s (+{d['generate_s']:.0f} s generating): held-out acceptance "
            f"{d['acceptance_before']:.3f} -> {d['acceptance_after']:.3f}"
        )
    if (m := result["mtp_batch1"]) is not None:
        print(
            f"MTP at batch 1 ({m['prompts']} prompts, T={m['temperature']}, {m['num_steps']} draft/verify): "
            f"plain {m['plain_tok_s']:.1f} tok/s, MTP {m['mtp_tok_s']:.1f} tok/s, speedup {m['speedup']:.2f}x "
            f"(decoding only, prompts' cost subtracted: {m['decode_only']['speedup']:.2f}x), "
            f"acceptance length {m['accept_length']:.2f}, step cost ratio {m['step_cost_ratio']:.2f}, "
            f"same output as plain: {m['same_output_share']} "
            f"(projected speedup at acceptance 1.7 / 2.0: {m['projected_speedup']['1.7']:.2f}x / "
            f"{m['projected_speedup']['2.0']:.2f}x)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
