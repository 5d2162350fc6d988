"""Run one embedded engine as a process: `python -m glm_rl.engine --hf-checkpoint DIR [--port P] ...`.

Prints `READY <url>` once it serves, and serves until SIGTERM / SIGINT (tests and benchmarks start engines this
way; the flags mirror SGLang's where one exists).
"""

from __future__ import annotations

import argparse
import signal
import threading

from glm_rl.engine.config import DTYPES, EngineConfig
from glm_rl.engine.engine import EmbeddedEngine


def parse_config(argv: list[str] | None = None) -> EngineConfig:
    p = argparse.ArgumentParser(
        prog="python -m glm_rl.engine",
        description="EmbeddedEngine: a torch rollout engine over the HF GLM-4.5 model, "
        "behind SGLang's native HTTP API.",
    )
    p.add_argument("--hf-checkpoint", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--max-batch-size", type=int, default=None, help="default: 64 on CPU, sized from free GPU memory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--enable-mtp", action="store_true", help="MTP speculative decoding")
    p.add_argument("--speculative-num-steps", type=int, default=1)
    p.add_argument(
        "--no-static-kv-cache",
        dest="static_kv_cache",
        action="store_false",
        help="decode with HF's DynamicCache instead of the preallocated cache",
    )
    p.add_argument("--disable-cuda-graph", action="store_true", help="static cache without CUDA graphs")
    p.add_argument("--enable-torch-compile", action="store_true", help="compile the graphed decode step")
    a = p.parse_args(argv)
    return EngineConfig(
        hf_checkpoint=a.hf_checkpoint,
        host=a.host,
        port=a.port,
        api_key=a.api_key,
        dtype=a.dtype,
        device=a.device,
        max_batch_size=a.max_batch_size,
        seed=a.seed,
        enable_mtp=a.enable_mtp,
        static_kv_cache=a.static_kv_cache,
        disable_cuda_graph=a.disable_cuda_graph,
        enable_torch_compile=a.enable_torch_compile,
        speculative_num_steps=a.speculative_num_steps,
    )


def main(argv: list[str] | None = None) -> None:
    """Run one engine as a process; prints `READY <url>` and serves until SIGTERM / SIGINT."""
    engine = EmbeddedEngine(parse_config(argv))
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(f"READY {engine.start()}", flush=True)
    done.wait()
    engine.shutdown()


if __name__ == "__main__":
    main()
