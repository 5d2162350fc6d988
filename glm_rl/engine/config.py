"""`EngineConfig`: the embedded engine's typed, frozen configuration, validated when built.

Why apart from the engine: launchers (Ray, `python -m glm_rl.engine`, the CLI) build and ship configs without
importing transformers or the engine's threads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    hf_checkpoint: str
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port
    api_key: str | None = None  # when set, requests (but /health*) need `Authorization: Bearer <key>`
    dtype: str = "float32"
    device: str = "cpu"  # "cuda" / "cuda:N": the model and its KV cache live there
    max_batch_size: int = 64  # rows per scheduler batch, and the largest batch /generate accepts
    max_total_len: int | None = None  # prompt + max_new_tokens limit; None: the model's max_position_embeddings
    seed: int = 0
    max_request_bytes: int = 64 << 20  # larger bodies get 413
    record_routed_experts: bool = True  # SGLang's --enable-return-routed-experts: off → such requests get 400
    # R3 behind sglang-router: the router drops `return_routed_experts` from the request body but passes the
    # answer through, so an engine started for R3 returns the routing unless a request says false.
    return_routed_experts_by_default: bool = False
    # answer routed experts in SGLang's wire form (int32, every decoder layer) instead of the compact one
    # (routed_experts.py); the fake SGLang server of the tests uses it, so clients are tested against that form
    sglang_routed_experts_form: bool = False
    # a weights-update group join (and each broadcast in it) that does not complete in this time fails with 400
    weight_group_timeout_s: float = 30.0
    # MTP speculative decoding (decode/speculative.py): draft with the checkpoint's MTP layer, verify in one
    # forward; the MTP layer's weights join the engine's weight names as `model.layers.{num_hidden_layers}.*`.
    enable_mtp: bool = False
    speculative_num_steps: int = 1  # MTP drafts per verify forward (SGLang's --speculative-num-steps)
    # decode (and MTP speculation) over a preallocated KV cache (decode/static.py); off: HF's DynamicCache path
    static_kv_cache: bool = True
    disable_cuda_graph: bool = False  # SGLang's flag: with the static cache on CUDA, decode steps are graphs
    enable_torch_compile: bool = False  # SGLang's flag: compile the graphed decode step (slow first batches)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"EngineConfig.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ValueError(f"EngineConfig.device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"EngineConfig.max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.speculative_num_steps < 1:
            raise ValueError(f"EngineConfig.speculative_num_steps must be >= 1, got {self.speculative_num_steps}")
