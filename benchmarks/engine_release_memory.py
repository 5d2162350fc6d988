"""What a colocated engine keeps on the GPU across release / resume (issue 20: the engine's reserved memory grew
~0.2 GiB a step in the colocated H100 run, and a release kept 0.30 of 0.32 GiB on the tiny model). GPU only.

    python benchmarks/engine_release_memory.py                          # tiny checkpoint, bf16
    python benchmarks/engine_release_memory.py --hf-checkpoint DIR --steps 6

An in-process engine generates a rollout-like batch (T = 1, logprobs, routed experts), releases all its memory
over HTTP (as `Colocation.to_train` does), resumes, and again, `--steps` times; per step it prints the reserved
and allocated GiB while active, after the release, and after a further `gc.collect()` + `empty_cache()`. Then a
CUDA memory snapshot says what is still allocated after the last release, grouped by allocation site (the top
frames of the stacks `torch.cuda.memory._record_memory_history` recorded) and by allocator pool. Writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from glm_rl.engine import EmbeddedEngine, EngineConfig  # noqa: E402
from glm_rl.models.glm45.presets import TINY_CHECKPOINT  # noqa: E402
from glm_rl.rollout.engine_client import EngineClient  # noqa: E402

GIB = 1 << 30


def memory() -> dict[str, float]:
    return {"reserved": torch.cuda.memory_reserved() / GIB, "allocated": torch.cuda.memory_allocated() / GIB}


def live_allocations(snapshot: dict, top: int = 15) -> tuple[list[dict], dict]:
    """(allocation sites still holding memory, largest first; reserved / allocated MiB per pool)."""
    sites: dict[str, list[float]] = {}
    pools: dict[str, list[float]] = {}
    for seg in snapshot["segments"]:
        pool = pools.setdefault(str(seg.get("segment_pool_id")), [0.0, 0.0])
        pool[0] += seg["total_size"] / 2**20
        pool[1] += seg["allocated_size"] / 2**20
        for block in seg["blocks"]:
            if block["state"] != "active_allocated":
                continue
            frames = [f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in block.get("frames", [])]
            site = sites.setdefault(" <- ".join([f for f in frames if ".py" in f][:3]) or "?", [0, 0.0])
            site[0] += 1
            site[1] += block["size"] / 2**20
    ranked = sorted(sites.items(), key=lambda kv: -kv[1][1])[:top]
    return [{"site": s, "blocks": n, "mib": round(m, 2)} for s, (n, m) in ranked], {
        k: {"reserved_mib": round(a, 1), "allocated_mib": round(b, 1)} for k, (a, b) in pools.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-checkpoint", default=str(TINY_CHECKPOINT))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_release_memory.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("engine_release_memory.py needs a GPU (a CPU engine frees nothing: there is nothing to see)")
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    engine = EmbeddedEngine(EngineConfig(hf_checkpoint=args.hf_checkpoint, device="cuda", dtype="bfloat16"))
    client = EngineClient(engine.start(), timeout=300)
    prompts = [[1, 2, 3 + i % 50, 5, 6, 7, 8, 9, 10, 11] for i in range(args.rows)]
    sampling = {"temperature": 1.0, "max_new_tokens": args.new_tokens, "ignore_eos": True}
    steps = []
    try:
        for step in range(args.steps):
            t0 = time.time()
            client.generate(prompts, sampling, return_logprob=True, return_routed_experts=True)
            row = {"step": step, "generate_s": round(time.time() - t0, 3), "active": memory()}
            client.release_memory_occupation()
            row["released"] = memory()
            gc.collect()
            torch.cuda.empty_cache()
            row["released_after_gc"] = memory()
            steps.append(row)
            print(json.dumps(row), flush=True)
            client.resume_memory_occupation(["weights"])
            client.resume_memory_occupation(["kv_cache"])
        client.release_memory_occupation()
        gc.collect()
        torch.cuda.empty_cache()
        sites, pools = live_allocations(torch.cuda.memory._snapshot())
    finally:
        engine.shutdown()
    print("\nstill allocated after the last release:")
    for s in sites:
        print(f"{s['mib']:9.2f} MiB in {s['blocks']:5d} blocks: {s['site']}")
    print("by pool:", pools)
    meta = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d")}
    meta["checkpoint"] = Path(args.hf_checkpoint).name  # no machine path in results
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "steps": steps, "live_sites": sites, "pools": pools}, indent=1))


if __name__ == "__main__":
    main()
