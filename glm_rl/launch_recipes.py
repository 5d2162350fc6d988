"""The GLM-4.5 launch recipes: one `Recipe` table per model (layout by GPU count, rollout sizing per hardware,
the fixed `glm-rl train` flags), and the prompt / response lengths every recipe uses.

Why its own module: the tables are data the launcher reads (`glm_rl/launch.py`); a recipe changes here without
touching how commands are built or run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from glm_rl.parallel import ParallelLayout


@dataclass(frozen=True)
class Recipe:
    """One model's table: layouts by node count, rollout sizing per hardware, and the fixed flags."""

    preset: str
    hf_name: str  # directory name under --work-dir
    layout_for_gpus: Callable[[int], ParallelLayout]  # by GPU count; DP derived later
    gpus_per_engine: dict[str, int]  # hardware -> SGLang engine size
    mem_fraction: dict[str, float]  # hardware -> --sglang-mem-fraction-static
    max_tokens_per_gpu: dict[str, int]  # hardware -> trainer micro-batch tokens
    train_flags: tuple[str, ...] = field(default=())


# -- layouts by GPU count and the shared flags ------------------------------------------------------------
def _layout_355b(gpus: int) -> ParallelLayout:
    """<= 32 GPUs (4 nodes of 8): TP4 PP1 CP1 EP4, the issue's small table, which `plan` refuses for the full
    model (the error says by how much); more: TP4 PP8 CP2 EP8 (64 GPUs and multiples), 92 layers as
    10 + 6 x 12 + 10."""
    if gpus <= 32:
        return ParallelLayout(tp=4, pp=1, cp=1, ep=4, etp=1, sequence_parallel=True)
    return ParallelLayout(
        tp=4,
        pp=8,
        cp=2,
        ep=8,
        etp=1,
        sequence_parallel=True,
        decoder_first_pipeline_num_layers=10,
        decoder_last_pipeline_num_layers=10,
    )


def _layout_air(gpus: int) -> ParallelLayout:
    """TP1 PP4 (46 layers as 11 + 12 + 12 + 11), EP4 up to 16 GPUs, EP8 from 32 (DP grows with the GPUs)."""
    return ParallelLayout(
        tp=1,
        pp=4,
        cp=1,
        ep=4 if gpus <= 16 else 8,
        etp=1,
        decoder_first_pipeline_num_layers=11,
        decoder_last_pipeline_num_layers=11,
    )


# Colocated, but weights move with p2p: config.py keeps the CUDA-IPC `tensor` path for the torch backend only.
_COMMON = (
    "--dtype",
    "bfloat16",
    "--use-tis",
    "--use-rollout-routing-replay",
    "--recompute-granularity",
    "full",
    "--recompute-method",
    "uniform",
    "--recompute-num-layers",
    "1",
    "--optimizer-cpu-offload",
    "--colocate",
    "--update-weight-transfer-mode",
    "p2p",
    "--rollout-engine",
    "sglang",
    "--kl-loss-coef",
    "0.0",
    "--num-rollout",
    "3000",
    "--save-interval",
    "20",
)
PROMPT_LEN, MAX_RESPONSE_LEN = 2048, 8192

GLM45_355B = Recipe(
    preset="glm45-355b-a32b",
    hf_name="GLM-4.5",
    layout_for_gpus=_layout_355b,
    gpus_per_engine={"H100": 32, "H200": 16, "B200": 16, "GB200": 16},
    mem_fraction={"H100": 0.7, "H200": 0.7, "B200": 0.75, "GB200": 0.75},
    max_tokens_per_gpu={"H100": 16384, "H200": 16384, "B200": 16384, "GB200": 16384},
    train_flags=_COMMON
    + (
        "--moe-token-dispatcher-type",
        "flex",
        "--moe-enable-deepep",
        "--rollout-batch-size",
        "64",
        "--n-samples-per-prompt",
        "8",
        "--global-batch-size",
        "512",
        "--lr",
        "1e-6",
    ),
)

GLM45_AIR = Recipe(
    preset="glm45-air-106b-a12b",
    hf_name="GLM-4.5-Air",
    layout_for_gpus=_layout_air,
    gpus_per_engine={"H100": 8, "H200": 8, "B200": 4, "GB200": 4},
    mem_fraction={"H100": 0.7, "H200": 0.75, "B200": 0.75, "GB200": 0.75},
    max_tokens_per_gpu={"H100": 8192, "H200": 16384, "B200": 16384, "GB200": 16384},
    train_flags=_COMMON
    + (
        "--moe-token-dispatcher-type",
        "alltoall",
        "--rollout-batch-size",
        "32",
        "--n-samples-per-prompt",
        "8",
        "--global-batch-size",
        "256",
        "--lr",
        "1e-6",
    ),
)
