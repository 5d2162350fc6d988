"""Save / load a Megatron GLM-4.5 model in megatron-core's `dist_checkpointing` torch_dist format.

Why this format: each rank writes its shards together with their place in the global tensor
(`model.sharded_state_dict()` → `ShardedTensor`s with global shape and offsets), so a checkpoint written
under one layout (TP2 × EP2, PP4, ...) loads under any other (TP1 on one process): the loader reads exactly the
slices the new layout asks for. It is also what Megatron training (`--load` / `--save`) reads and writes.

Besides the model, a checkpoint carries in its common (non-tensor) state one `glm_rl` entry:
- `hf_config`: the HF config.json it was imported from (the architecture, checked again on export / load);
- `written_with`: the parallel layout that wrote it (informational: any layout can load it);
- `mtp`: whether the model was built with its MTP layer (a loader must build the same modules).

Runs on CPU/gloo as it is: megatron-core 0.19.2's torch_dist save / load needed no shim beyond the ones
`setup_model_parallel` applies (checked: TP1, TP2×EP2 save → TP1 load, bitwise). One cost-only patch, scoped
to our own synchronous save (`_in_process_results_queue`): megatron's writer hands its results back through a
`multiprocessing.Manager().Queue()`, which spawns a server interpreter per saving process (seconds on the CI
box, re-importing the caller's main module) only to serve an async writer process; a sync save writes from
threads of this process, so a plain `queue.Queue` serves it.
`save_model` / `load_model` are collective: call them on every rank of the model's process group.
"""

from __future__ import annotations

import queue
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

META_KEY = "glm_rl"
FORMAT_VERSION = 1


class DistCheckpointError(ValueError):
    """A directory that is not a glm_rl torch_dist checkpoint, or one that does not fit the model."""


def save_model(model: torch.nn.Module, path: str | Path, meta: dict[str, Any]) -> None:
    """Write this rank's shards of `model` into the empty dir `path`. `meta` (JSON-like: `hf_config`,
    `written_with`, `mtp`) must be the same on every rank: it goes into the common state once."""
    from megatron.core import dist_checkpointing

    sharded = model.sharded_state_dict()
    sharded[META_KEY] = {**meta, "format_version": FORMAT_VERSION}
    with _in_process_results_queue():
        dist_checkpointing.save(sharded, str(path))


@contextmanager
def _in_process_results_queue():
    """For the duration of a sync save: megatron-core 0.19.2's module-level results queue is a plain queue
    (module docstring); restored afterwards, so an async save elsewhere still gets its Manager queue."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    saved = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = saved


def read_meta(path: str | Path) -> dict[str, Any]:
    """The `glm_rl` entry of a checkpoint, without building a model or a process group (cheap: use it to
    validate before heavy work). Raises naming the directory when it is not a glm_rl torch_dist checkpoint."""
    from megatron.core.dist_checkpointing import load_common_state_dict

    path = Path(path)
    if not path.is_dir():
        raise DistCheckpointError(f"{path}: no such directory (expected a torch_dist checkpoint)")
    if not (path / "metadata.json").is_file():
        raise DistCheckpointError(
            f"{path}: no metadata.json — not a megatron torch_dist checkpoint (write one with `glm-rl convert import`)"
        )
    meta = load_common_state_dict(str(path)).get(META_KEY)
    if not isinstance(meta, dict) or "hf_config" not in meta:
        raise DistCheckpointError(
            f"{path}: a torch_dist checkpoint without the `{META_KEY}` entry "
            "(not written by glm_rl; its architecture is unknown)"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise DistCheckpointError(
            f"{path}: glm_rl checkpoint format {meta.get('format_version')!r}, this version reads {FORMAT_VERSION}"
        )
    return meta


def load_model(model: torch.nn.Module, path: str | Path) -> dict[str, Any]:
    """Fill `model` (any layout) from the checkpoint at `path` and return its meta. Strict: every model tensor
    must be in the checkpoint, and a shape that does not fit raises naming the key."""
    from megatron.core import dist_checkpointing

    meta = read_meta(path)
    try:
        loaded = dist_checkpointing.load(model.sharded_state_dict(), str(path))
    except Exception as e:  # megatron's CheckpointingException names the key / shape that does not fit
        raise DistCheckpointError(f"{path}: cannot load into this model: {e}") from e
    loaded.pop(META_KEY, None)
    model.load_state_dict(loaded, strict=True)
    return meta
