"""Rollout dumps (slime's `--save-debug-rollout-data` / `--load-debug-rollout-data`): one file per step.

A dump holds what the rollout produced for the step — every sample's prompt and response ids, rollout logprobs,
reward, finish reason, weight version, routed experts (R3), label, metadata, tools, loss mask and graded text —
and the step's rollout metrics. Advantages, old logprobs and corrections are left out: the driver recomputes
them. Saved with `torch.save` as plain containers and one int16 tensor per sample's routing, and read back with
`torch.load(weights_only=True)`, so loading a dump never runs pickled code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from glm_rl.rollout.samples import Sample

FORMAT = "glm_rl.rollout_dump.v1"
# what the rollout sets; the rest (advantage, old / ref logprobs, routing of R2, weights, masks) the driver derives
SAVED_FIELDS = (
    "index",
    "group",
    "prompt_ids",
    "response_ids",
    "rollout_logprobs",
    "reward",
    "finish_reason",
    "weight_version",
    "token_versions",
    "routed_experts",
    "label",
    "metadata",
    "tools",
    "loss_mask",
    "response_text",
)


def _to_plain(s: Sample) -> dict[str, Any]:
    out = {name: getattr(s, name) for name in SAVED_FIELDS}
    if s.routed_experts is not None:
        out["routed_experts"] = torch.from_numpy(np.ascontiguousarray(s.routed_experts, dtype=np.int16))
    return out


def _from_plain(d: dict[str, Any]) -> Sample:
    routed = d.get("routed_experts")
    fields = {k: v for k, v in d.items() if k in SAVED_FIELDS}
    fields["routed_experts"] = routed.numpy() if routed is not None else None
    return Sample(**fields)


def save_rollout(path: Path, step: int, samples: list[Sample], metrics: dict[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {"format": FORMAT, "rollout_id": step, "samples": [_to_plain(s) for s in samples], "metrics": dict(metrics)},
        tmp,
    )
    tmp.replace(path)  # a reader never sees half a file


def load_rollout(path: Path, step: int) -> tuple[list[Sample], dict[str, float]]:
    """The samples and rollout metrics saved for `step` (ValueError naming the file when it is not one)."""
    try:
        data = torch.load(path, weights_only=True)
    except Exception as e:  # not a torch file, or one holding objects weights_only refuses
        raise ValueError(f"{path}: not a rollout dump of --save-debug-rollout-data ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a rollout dump of --save-debug-rollout-data (format {FORMAT})")
    if data["rollout_id"] != step:
        raise ValueError(f"{path}: holds rollout {data['rollout_id']}, expected {step}")
    return [_from_plain(d) for d in data["samples"]], data["metrics"]
