"""The embedded engine's decode batch from free GPU memory (`batch_rows_for_memory`): reference values."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import Glm4MoeConfig

from glm_rl.engine import EmbeddedEngine, EngineConfig
from glm_rl.engine.config import MAX_BATCH_ROWS, batch_rows_for_memory
from glm_rl.models.glm45.presets import TINY_CHECKPOINT

GIB = 1 << 30


def _config(**kw) -> Glm4MoeConfig:
    base = dict(num_hidden_layers=8, num_key_value_heads=2, hidden_size=1024, num_attention_heads=8, head_dim=128)
    return Glm4MoeConfig(**{**base, "max_position_embeddings": 4096, **kw})


def test_rows_follow_kv_bytes_per_row():
    # 1 B reference shape: K+V x 8 layers x 2 heads x 128 x 2 bytes x 4096 slots = 32 MiB a row
    assert batch_rows_for_memory(10 * GIB, _config(), torch.bfloat16, 0.3) == 96  # 3 GiB / 32 MiB = 96
    assert batch_rows_for_memory(10 * GIB, _config(), torch.float32, 0.3) == 48  # twice the bytes
    # a shorter context budgets fewer slots a row: 1024 slots -> 8 MiB a row, 384 rows
    assert batch_rows_for_memory(10 * GIB, _config(max_position_embeddings=1024), torch.bfloat16, 0.3) == 384
    # the MTP layer's cache counts: 9 layers -> 36 MiB, 85 rows, down to 80
    assert batch_rows_for_memory(10 * GIB, _config(num_nextn_predict_layers=1), torch.bfloat16, 0.3, mtp=True) == 80


def test_rows_are_clamped():
    assert batch_rows_for_memory(0, _config(), torch.bfloat16, 0.3) == 8
    assert batch_rows_for_memory(10_000 * GIB, _config(), torch.bfloat16, 0.3) == MAX_BATCH_ROWS


def test_cpu_engine_takes_64_and_config_checks_the_fraction():
    engine = EmbeddedEngine(EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT)))
    try:
        engine.start()
        assert engine.config.max_batch_size == 64 and engine.server_info()["max_running_requests"] == 64
    finally:
        engine.shutdown()
    with pytest.raises(ValueError, match="kv_memory_fraction"):
        EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT), kv_memory_fraction=0)


def test_a_burst_of_requests_arriving_apart_is_one_batch():
    """Regression (H100, 2026-12-07): a rollout's 512 requests reached the engine over some milliseconds and it
    decoded the first alone, then the other 511. The scheduler now holds a batch while requests keep arriving."""
    from glm_rl.engine.batch import GenerationRequest, SamplingParams

    # a 50 ms gap (default 10 ms) so a busy 2-core CI machine's scheduling hiccups do not split the burst
    engine = EmbeddedEngine(EngineConfig(hf_checkpoint=str(TINY_CHECKPOINT), max_batch_size=16, batch_gap_ms=50))
    engine.start()
    try:
        futures = []
        for i in range(12):  # 12 requests, 2 ms apart: within the gap
            req = GenerationRequest(
                rid=f"r{i}", input_ids=(1, 2, 4, 23), sampling=SamplingParams(max_new_tokens=4), seed=i
            )
            futures += engine.submit([req])
            time.sleep(0.002)
        for f in futures:
            f.result(timeout=60)
        stats = engine.stats
        assert stats["batches_total"] == 1 and stats["max_batch_rows"] == 12, stats
    finally:
        engine.shutdown()
