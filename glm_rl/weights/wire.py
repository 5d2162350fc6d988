"""What a weight update looks like on the wire, both ends of each format in one module.

Why one module: the trainer's transports and client encode, the engine decodes, and the two must agree byte for
byte; keeping `serialize_*` next to `deserialize_*` (and the dtype names and checksum both sides compute) means
a format changes in one place.
- `update_weights_from_tensor` payloads (SGLang's, colocated path): base64 of a ForkingPickler pickle, so CPU
  tensors in shared memory travel by name and CUDA tensors as IPC handles, never by value.
  `serialize_named_tensors` / `deserialize_named_tensors`: a list of (name, tensor);
  `serialize_flattened` / `deserialize_flattened`: load_format "flattened_bucket", one uint8 buffer and its
  layout (`weights/flat.py`).
- `parse_dtype`: the dtype names `update_weights_from_distributed` and `/p2p/prepare` carry.
- `tensor_checksum`: the digest `/weights_checksum` returns, so the trainer can compare bit for bit.
- `WeightError`: a weight payload or update the engine refuses (answered as HTTP 400).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import pickle
import threading
from collections.abc import Iterable, Iterator
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch
import torch.multiprocessing  # noqa: F401 - registers the tensor reductions on ForkingPickler

from glm_rl.weights.flat import FlatEntry, entries_from_json


class WeightError(ValueError):
    """A weight update or checksum request the engine refuses (bad payload, unknown name, wrong shape, bad group)."""


def tensor_checksum(t: torch.Tensor) -> str:
    """sha256 hex digest of the tensor's raw bytes (cast to the engine's dtype first to compare)."""
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


def parse_dtype(name: str) -> torch.dtype:
    """'float32' / 'torch.float32' / 'bf16'-style names → torch dtype (ValueError naming it otherwise)."""
    key = str(name).removeprefix("torch.")
    key = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(key, key)
    dtype = getattr(torch, key, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


# torch's sharing strategy is process-global: this lock keeps concurrent serialisations (one thread per engine)
# from restoring it under each other's feet.
_SHARING_LOCK = threading.Lock()


@contextlib.contextmanager
def _file_system_sharing() -> Iterator[None]:
    """Use torch's "file_system" sharing strategy while pickling (shared-memory files are named, not fds)."""
    with _SHARING_LOCK:
        before = torch.multiprocessing.get_sharing_strategy()
        torch.multiprocessing.set_sharing_strategy("file_system")
        try:
            yield
        finally:
            torch.multiprocessing.set_sharing_strategy(before)


def _serialize(obj: Any) -> str:
    """base64 of a ForkingPickler pickle: CPU tensors in shared memory travel by name, CUDA ones as IPC handles."""
    buf = io.BytesIO()
    with _file_system_sharing():
        ForkingPickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def serialize_named_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """base64 of a ForkingPickler pickle of [(name, tensor)]: CPU tensors move to shared memory (as in
    torch.multiprocessing) and travel by name; keep them alive until the engine has answered."""
    return _serialize([(str(n), t) for n, t in named_tensors])


def deserialize_named_tensors(payload: str) -> list[tuple[str, torch.Tensor]]:
    """Inverse of `serialize_named_tensors` (unpickles: only for trusted callers, like SGLang)."""
    try:
        items = pickle.loads(base64.b64decode(payload))
    except Exception as e:  # noqa: BLE001 - any decoding failure is the caller's bad input
        raise WeightError(f"serialized_named_tensors: cannot decode ({type(e).__name__}: {e})") from e
    if not isinstance(items, list) or not all(
            isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], torch.Tensor)
            for x in items):
        raise WeightError("serialized_named_tensors: expected a pickled list of (name, tensor) pairs")
    return items


def serialize_flattened(flat: torch.Tensor, layout: list[list]) -> str:
    """load_format "flattened_bucket": one shared uint8 buffer and its layout (`flat.entries_to_json`); keep
    `flat` alive until the engine has answered."""
    return _serialize({"flattened_tensor": flat, "metadata": layout})


def deserialize_flattened(payload: str) -> tuple[torch.Tensor, list[FlatEntry]]:
    """Inverse of `serialize_flattened`: the shared buffer (uint8) and its layout, no copy."""
    try:
        obj = pickle.loads(base64.b64decode(payload))
        flat, entries = obj["flattened_tensor"], entries_from_json(obj["metadata"])
        if flat.dtype != torch.uint8 or flat.dim() != 1:
            raise ValueError(f"flattened_tensor must be 1-D uint8, got {flat.dtype} {tuple(flat.shape)}")
        return flat, entries
    except Exception as e:  # noqa: BLE001 - any decoding failure is the caller's bad input
        raise WeightError(f"serialized_named_tensors: bad flattened bucket ({type(e).__name__}: {e})") from e
