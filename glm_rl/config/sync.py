"""The `sync` section: how trainer weights reach the engines after each step (handed whole to the trainer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from glm_rl.config.fields import opt


@dataclass(frozen=True)
class SyncConfig:
    update_weight_transfer_mode: Literal["tensor", "broadcast", "p2p"] = opt(
        "broadcast",
        "tensor (colocated: shared memory / CUDA IPC), broadcast (torch.distributed group) or p2p "
        "(Mooncake one-sided writes from every trainer rank, following a transfer plan)",
    )
    update_weight_buffer_size: int = opt(1 << 20, "bytes per weight-sync bucket")
    check_weight_update_equal: bool = opt(True, "verify every tensor bitwise after each sync")
    rollout_fp8: bool = opt(
        False,
        "send the linear weights block-quantized to FP8 (e4m3, 128x128 blocks + scales) "
        "in each weight sync; engines dequantize on load (BF16 training, FP8 rollout)",
    )
