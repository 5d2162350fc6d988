"""Fake `python -m sglang.launch_server` for the SGLangEngine lifecycle test (SGLang needs CUDA).

It accepts the flags glm_rl emits (all checked against the pinned SGLang's flag list by the caller), spawns a
child process as SGLang does (so process-group shutdown is exercised), and serves glm_rl's embedded engine,
which speaks the same HTTP API, on --host / --port.
"""

import argparse
import signal
import subprocess
import sys
import threading

from glm_rl.engine import EmbeddedEngine, EngineConfig

p = argparse.ArgumentParser()
p.add_argument("--model-path", required=True)
p.add_argument("--host", default="127.0.0.1")
p.add_argument("--port", type=int, default=30000)
p.add_argument("--api-key")
p.add_argument("--enable-return-routed-experts", action="store_true")
args, _ = p.parse_known_args()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])  # like SGLang's scheduler
engine = EmbeddedEngine(
    EngineConfig(
        hf_checkpoint=args.model_path,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        record_routed_experts=args.enable_return_routed_experts,
        sglang_routed_experts_form=True,  # int32 over every layer, base64: what SGLang answers
    )
)
engine.start()
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
done.wait()
engine.shutdown()
