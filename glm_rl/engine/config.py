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
    # rows per scheduler batch, and the largest batch /generate accepts; None: 64 on CPU, on a GPU as many rows as
    # `kv_memory_fraction` of the free memory holds at start (`batch_rows_for_memory` below)
    max_batch_size: int | None = None
    kv_memory_fraction: float = 0.3  # colocated engines share the GPU with a trainer: SGLang's 0.88 would not fit
    # a batch waits for requests still arriving: each within batch_gap_ms of the last, batch_window_ms in all
    batch_gap_ms: float = 20.0
    batch_window_ms: float = 500.0
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
        if not 0 < self.kv_memory_fraction <= 1:
            raise ValueError(f"EngineConfig.kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")
        if self.batch_gap_ms < 0 or self.batch_window_ms < 0:
            raise ValueError(
                f"EngineConfig.batch_gap_ms / batch_window_ms must be >= 0, got {self.batch_gap_ms} / "
                f"{self.batch_window_ms}"
            )
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"EngineConfig.max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.speculative_num_steps < 1:
            raise ValueError(f"EngineConfig.speculative_num_steps must be >= 1, got {self.speculative_num_steps}")


CPU_BATCH_ROWS = 64  # the embedded engine's batch on CPU, where rows cost compute, not memory
MAX_BATCH_ROWS = 1024  # past this a decode step is compute-bound on an H100 for the models this engine serves
ROW_SLOTS_ESTIMATE = 4096  # KV slots a row is budgeted (capped by the model's context) when sizing the batch


def batch_rows_for_memory(
    free_bytes: int, model_config, dtype: torch.dtype, fraction: float, *, mtp: bool = False
) -> int:
    """Rows of a GPU decode batch: as many as `fraction` of `free_bytes` holds in KV cache (K and V of every layer,
    with `mtp` the MTP layer's too, `ROW_SLOTS_ESTIMATE` slots each), a multiple of 8 in [8, MAX_BATCH_ROWS].

    Why from memory: RL sends a whole rollout (hundreds of sequences) at once; a fixed small batch decodes it in
    waves at a fraction of the GPU's throughput (SGLang sizes --max-running-requests the same way)."""
    c = model_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    layers = c.num_hidden_layers + (getattr(c, "num_nextn_predict_layers", 0) if mtp else 0)
    slots = min(ROW_SLOTS_ESTIMATE, c.max_position_embeddings)
    row_bytes = 2 * layers * c.num_key_value_heads * head_dim * dtype.itemsize * slots
    rows = int(fraction * free_bytes) // row_bytes
    return max(8, min(MAX_BATCH_ROWS, rows // 8 * 8))
