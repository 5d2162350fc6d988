"""SGLangEngine: one `python -m sglang.launch_server` process per engine, driven like the embedded engine.

The pinned SGLang is 0.5.23 (`pip install glm-rl[sglang]`, GPU only). The actor builds the server command
from the typed config as a `list[str]` (snapshot-tested), starts it in its own process group, waits for
`/health`, and hands back its URL; generation, weight updates, pause / continue and memory release then go
through the same `EngineClient` and router as the embedded engine. Shutdown kills the whole process group
(SGLang starts scheduler / detokenizer children).

Every flag and request field we emit is checked against `sglang_contract.json`, extracted from the pinned
wheel by `tools/extract_sglang_contract.py`: a name SGLang does not define is an error at config time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from glm_rl.rollout.engine_client import EngineClient

SGLANG_VERSION = "0.5.23"
CONTRACT_PATH = Path(__file__).with_name("sglang_contract.json")


@lru_cache(maxsize=1)
def contract() -> dict:
    return json.loads(CONTRACT_PATH.read_text())


def check_server_flags(cmd: list[str]) -> None:
    """Raise naming every `--flag` in `cmd` that SGLang's launch_server does not define."""
    known = set(contract()["server_flags"])
    unknown = [t for t in cmd if t.startswith("--") and t.split("=", 1)[0] not in known]
    if unknown:
        raise ValueError(f"SGLang {contract()['sglang_version']} has no server flag(s) {unknown}")


@dataclass(frozen=True, kw_only=True)
class SGLangServerConfig:
    model_path: str
    host: str = "127.0.0.1"
    port: int = 30000  # 0: a free port, chosen when the engine starts
    tp_size: int = 1
    ep_size: int = 1
    dp_size: int = 1
    enable_dp_attention: bool = False
    mem_fraction_static: float | None = None
    context_length: int | None = None
    base_gpu_id: int = 0
    random_seed: int | None = None
    api_key: str | None = None
    enable_return_routed_experts: bool = False  # R3
    enable_memory_saver: bool = False  # colocate: release / resume memory around training
    quantization: str | None = None  # "fp8" for FP8 rollout checkpoints
    # MTP speculative decoding (EAGLE-style in SGLang)
    speculative_num_steps: int = 0  # 0: off
    speculative_eagle_topk: int = 1
    speculative_num_draft_tokens: int = 2
    extra_args: tuple[tuple[str, str | None], ...] = field(default=())  # --sglang-<field> pass-through


def build_command(cfg: SGLangServerConfig, python: str = sys.executable) -> list[str]:
    """The launch_server command, one flag per element pair; validated against the pinned SGLang."""
    cmd = [
        python,
        "-m",
        "sglang.launch_server",
        "--model-path",
        cfg.model_path,
        "--host",
        cfg.host,
        "--port",
        str(cfg.port),
        "--tp-size",
        str(cfg.tp_size),
        "--base-gpu-id",
        str(cfg.base_gpu_id),
        "--trust-remote-code",
        "--skip-server-warmup",
    ]
    if cfg.ep_size > 1:
        cmd += ["--ep-size", str(cfg.ep_size)]
    if cfg.dp_size > 1:
        cmd += ["--dp-size", str(cfg.dp_size)]
    if cfg.enable_dp_attention:
        cmd += ["--enable-dp-attention"]
    for flag, value in (
        ("--mem-fraction-static", cfg.mem_fraction_static),
        ("--context-length", cfg.context_length),
        ("--random-seed", cfg.random_seed),
        ("--api-key", cfg.api_key),
        ("--quantization", cfg.quantization),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    if cfg.enable_return_routed_experts:
        cmd += ["--enable-return-routed-experts"]
    if cfg.enable_memory_saver:
        cmd += ["--enable-memory-saver"]
    if cfg.speculative_num_steps > 0:
        cmd += [
            "--speculative-algorithm",
            "EAGLE",
            "--speculative-num-steps",
            str(cfg.speculative_num_steps),
            "--speculative-eagle-topk",
            str(cfg.speculative_eagle_topk),
            "--speculative-num-draft-tokens",
            str(cfg.speculative_num_draft_tokens),
            "--enable-weights-cpu-backup",
        ]
    for name, value in cfg.extra_args:
        cmd += [f"--{name}"] + ([] if value is None else [value])
    check_server_flags(cmd[3:])
    return cmd


class SGLangEngine:
    """One SGLang server process; `start()` → URL. Wrap with `ray.remote(num_gpus=tp_size)` on a cluster."""

    def __init__(self, cfg: SGLangServerConfig, startup_timeout_s: float = 900.0) -> None:
        self.cfg, self.timeout = cfg, startup_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.port}"

    def start(self) -> str:
        if self.cfg.port == 0:  # pick a free port on the node this actor landed on
            with socket.socket() as sock:
                sock.bind((self.cfg.host, 0))
                self.cfg = dataclasses.replace(self.cfg, port=sock.getsockname()[1])
        cmd = build_command(self.cfg)
        self.proc = subprocess.Popen(cmd, start_new_session=True)  # own process group: killed as one
        client = EngineClient(self.url, self.cfg.api_key, timeout=5)
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SGLang server exited with code {self.proc.returncode}: {' '.join(cmd)}")
            if client.health():
                return self.url
            time.sleep(1.0)
        self.shutdown()
        raise TimeoutError(f"SGLang server at {self.url} not healthy after {self.timeout:.0f}s")

    def get_url(self) -> str:
        return self.url

    def shutdown(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
