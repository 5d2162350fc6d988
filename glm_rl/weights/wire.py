"""What a weight update looks like on the wire, both ends of each format in one module.

Why one module: the trainer's transports and client encode, the engine decodes, and the two must agree byte for
byte; keeping each encoder next to its decoder (and the dtype names and checksum both sides compute) means a
format changes in one place.

`update_weights_from_tensor` payloads (entry 0 of `serialized_named_tensors`) come in two forms:
- `glm_rl.tensors.v1` (ours; what `EngineClient` sends to an embedded engine): JSON text, nothing in it runs
  code. `{"format", "buffers": [...], "tensors": [{"name", "buffer", "dtype", "shape", "stride", "offset"}],
  "metadata"?}`: each tensor is a strided view (offset and stride in elements) of one buffer. A buffer is
  `inline` (base64 bytes, from anyone), `shm` (a torch shared-memory file by name: `manager`, `handle`, `nbytes`,
  what torch's file_system sharing passes) or `cuda_ipc` (the fields of torch's CUDA IPC reduction as plain
  values); the two by-reference kinds are opened only for a trusted (authenticated) caller, since they reach
  into other processes' memory. "flattened_bucket" is one uint8 tensor named `flattened_tensor` plus its layout
  in `metadata` (`weights/flat.py`).
- SGLang's: base64 of a ForkingPickler pickle (`serialize_named_tensors` / `serialize_flattened`, what a real
  SGLang engine needs; in `wire_sglang.py`, re-exported here). The engine decodes it only for a trusted caller,
  and even then with an unpickler that resolves nothing but torch's tensor-rebuild functions, so a crafted pickle
  cannot run code; `deserialize_*` here check what it rebuilt.
`decode_named_tensors` / `decode_flattened` take either form (JSON starts with `{`) and enforce both rules.

Also: `parse_dtype` (the dtype names weight routes carry), `tensor_checksum` (the digest `/weights_checksum`
returns), `WeightError` (a weight payload or update the engine refuses: HTTP 400).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Iterable
from typing import Any

import torch
from torch.multiprocessing import reductions

from glm_rl.weights.digest import tensor_digest
from glm_rl.weights.flat import FlatEntry, entries_from_json
from glm_rl.weights.wire_sglang import SHARING_LOCK, serialize_flattened, serialize_named_tensors, unpickle_tensors

FORMAT = "glm_rl.tensors.v1"
Named = list[tuple[str, torch.Tensor]]


class WeightError(ValueError):
    """A weight update or checksum request the engine refuses (bad payload, unknown name, wrong shape, bad group)."""


CHECKSUM_ALGOS = ("sha256", "d128")


def checksum_algo(tensors: Iterable[torch.Tensor]) -> str:
    """The digest both sides of a verification use: `d128` (computed on the device, `weights/digest.py`) when
    the source holds CUDA tensors, else sha256 of the bytes on the host (fast there, and the CPU's default)."""
    return "d128" if any(t.is_cuda for t in tensors) else "sha256"


def tensor_checksum(t: torch.Tensor, algo: str = "sha256") -> str:
    """Digest of the tensor's raw bytes (cast to the engine's dtype first to compare): sha256 hex of the bytes
    (copied to the host), or `d128:` + the device-side digest."""
    if algo == "d128":
        return "d128:" + tensor_digest(t)
    if algo != "sha256":
        raise WeightError(f"algo: expected one of {CHECKSUM_ALGOS}, got {algo!r}")
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


# -- glm_rl.tensors.v1: encoding ---------------------------------------------------------------------------------
def shared_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of CPU tensor `t` in torch's named shared memory (one copy; what `shm` buffers name)."""
    storage = torch.UntypedStorage._new_using_filename_cpu(max(1, t.numel() * t.element_size()))
    return torch.empty(0, dtype=t.dtype).set_(storage, 0, t.shape).copy_(t.detach())


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode("ascii")


def _reference(t: torch.Tensor) -> dict[str, Any]:
    """A buffer naming `t`'s whole storage in shared memory (a CPU storage is moved there once, in place)."""
    if t.is_cuda:  # as torch's reduce_tensor: share the storage's allocation, remember it for this process
        storage = t._typed_storage()
        dev, handle, size, off, rc_handle, rc_off, ev_handle, ev_sync = storage._share_cuda_()
        reductions.shared_cache[handle] = reductions.StorageWeakRef(storage)
        return {
            "kind": "cuda_ipc",
            "device": dev,
            "handle": _b64(handle),
            "nbytes": size,
            "storage_offset": off,
            "ref_counter_handle": _b64(rc_handle),
            "ref_counter_offset": rc_off,
            "event_handle": _b64(ev_handle),
            "event_sync_required": bool(ev_sync),
        }
    manager, handle, size = t.untyped_storage()._share_filename_cpu_()
    return {"kind": "shm", "manager": manager.decode(), "handle": handle.decode(), "nbytes": size}


def _inline(t: torch.Tensor) -> dict[str, Any]:
    raw = t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return {"kind": "inline", "nbytes": len(raw), "data": _b64(raw)}


def _encode(named: Iterable[tuple[str, torch.Tensor]], by_reference: bool, **extra: Any) -> str:
    buffers: list[dict] = []
    seen: dict[int, int] = {}  # storage (its StorageImpl) → buffer index
    tensors = []
    with SHARING_LOCK:
        for name, t in named:
            t = t.detach()
            if by_reference and t.numel() > 0:
                key = t.untyped_storage()._cdata
                if key not in seen:
                    seen[key] = len(buffers)
                    buffers.append(_reference(t))
                index, offset, stride = seen[key], t.storage_offset(), list(t.stride())
            else:
                index, offset, stride = len(buffers), 0, list(t.contiguous().stride())
                buffers.append(_inline(t))
            tensors.append(
                {
                    "name": str(name),
                    "buffer": index,
                    "dtype": str(t.dtype).removeprefix("torch."),
                    "shape": list(t.shape),
                    "stride": stride,
                    "offset": offset,
                }
            )
    return json.dumps({"format": FORMAT, "buffers": buffers, "tensors": tensors, **extra}, separators=(",", ":"))


def encode_named_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]], *, by_reference: bool) -> str:
    """glm_rl.tensors.v1 of [(name, tensor)]: by reference (CPU tensors' storages move to shared memory in place,
    CUDA ones travel as IPC handles; keep them alive until the engine has answered), or inline bytes."""
    return _encode(named_tensors, by_reference)


def encode_flattened(flat: torch.Tensor, layout: list[list], *, by_reference: bool) -> str:
    """glm_rl.tensors.v1 of load_format "flattened_bucket": the uint8 buffer and its layout
    (`flat.entries_to_json`); by reference, keep `flat` alive until the engine has answered."""
    return _encode([("flattened_tensor", flat)], by_reference, metadata=layout)


# -- glm_rl.tensors.v1: decoding ---------------------------------------------------------------------------------
_SHM_HANDLE = re.compile(r"/torch_\d+_\d+_\d+")


def _nat(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise WeightError(f"{where}: expected a non-negative int, got {value!r}")
    return value


def _unb64(value: Any, where: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (TypeError, binascii.Error) as e:
        raise WeightError(f"{where}: expected base64 ({e})") from None


def _open_shm(b: dict, where: str) -> torch.UntypedStorage:
    manager, handle, nbytes = b.get("manager"), b.get("handle"), _nat(b.get("nbytes"), f"{where}.nbytes")
    if not isinstance(handle, str) or not _SHM_HANDLE.fullmatch(handle):
        raise WeightError(f"{where}.handle: expected a torch shared-memory name /torch_<pid>_<n>_<n>, got {handle!r}")
    if not (
        isinstance(manager, str)
        and os.path.isabs(manager)
        and os.path.basename(manager) == "manager.sock"
        and stat.S_ISSOCK(os.stat(manager).st_mode if os.path.exists(manager) else 0)
    ):
        raise WeightError(f"{where}.manager: expected the path of torch's shm manager socket, got {manager!r}")
    path = "/dev/shm" + handle  # Linux: a named segment is this file; check it holds nbytes (else SIGBUS later)
    if os.path.isdir("/dev/shm") and (not os.path.isfile(path) or os.stat(path).st_size < nbytes):
        raise WeightError(f"{where}: no shared-memory segment {handle!r} of {nbytes} bytes")
    try:
        return torch.UntypedStorage._new_shared_filename_cpu(manager.encode(), handle.encode(), nbytes)
    except RuntimeError as e:
        raise WeightError(f"{where}: cannot open {handle!r} ({e})") from None


def _open_buffer(b: Any, where: str, trusted: bool) -> Any:
    """A buffer → its UntypedStorage (checked; by-reference kinds only for a trusted caller)."""
    kind = b.get("kind") if isinstance(b, dict) else None
    if kind == "inline":
        raw = _unb64(b.get("data"), f"{where}.data")
        if len(raw) != _nat(b.get("nbytes"), f"{where}.nbytes"):
            raise WeightError(f"{where}: {len(raw)} bytes, nbytes says {b.get('nbytes')}")
        return torch.frombuffer(bytearray(raw) or bytearray(1), dtype=torch.uint8).untyped_storage()
    if kind not in ("shm", "cuda_ipc"):
        raise WeightError(f"{where}.kind: expected 'inline', 'shm' or 'cuda_ipc', got {kind!r}")
    if not trusted:
        raise WeightError(
            f"{where}: {kind} buffers are opened only for an authenticated caller (start the "
            f"engine with an API key, or send inline buffers)"
        )
    if kind == "shm":
        return _open_shm(b, where)
    return _open_cuda(b, where)


def _open_cuda(b: dict, where: str) -> torch.UntypedStorage:
    """A cuda_ipc buffer → its storage, opened once (as torch's rebuild_cuda_tensor does for each tensor)."""
    device, nbytes = _nat(b.get("device"), f"{where}.device"), _nat(b.get("nbytes"), f"{where}.nbytes")
    handle = _unb64(b.get("handle"), f"{where}.handle")
    offset = _nat(b.get("storage_offset"), f"{where}.storage_offset")
    counter = (
        _unb64(b.get("ref_counter_handle"), f"{where}.ref_counter_handle"),
        _nat(b.get("ref_counter_offset"), f"{where}.ref_counter_offset"),
    )
    event = None if b.get("event_handle") is None else _unb64(b["event_handle"], f"{where}.event_handle")
    try:
        storage = reductions.storage_from_cache(torch.UntypedStorage, (handle, offset))
        if storage is not None:  # already open here: release the producer's extra reference, as torch does
            torch.UntypedStorage._release_ipc_counter_cuda(*counter)
            return storage
        torch.cuda._lazy_init()
        storage = torch.UntypedStorage._new_shared_cuda(
            device, handle, nbytes, offset, *counter, event, bool(b.get("event_sync_required"))
        )
    except RuntimeError as e:
        raise WeightError(f"{where}: cannot open the CUDA IPC handle ({e})") from None
    reductions.shared_cache[(handle, offset)] = reductions.StorageWeakRef(storage)
    return storage


def _view(spec: Any, buffers: list, where: str) -> tuple[str, torch.Tensor]:
    """One tensor spec → (name, view of its buffer), after checking it lies inside the buffer."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise WeightError(f"{where}: expected an object with a string 'name'")
    index = _nat(spec.get("buffer"), f"{where}.buffer")
    if index >= len(buffers):
        raise WeightError(f"{where}.buffer: {index} out of range ({len(buffers)} buffers)")
    try:
        dtype = parse_dtype(spec.get("dtype"))
    except ValueError as e:
        raise WeightError(f"{where}.dtype: {e}") from None
    shape, stride = spec.get("shape"), spec.get("stride")
    if not (isinstance(shape, list) and isinstance(stride, list) and len(shape) == len(stride) <= 8):
        raise WeightError(f"{where}: shape and stride must be lists of equal length (at most 8)")
    shape = [_nat(d, f"{where}.shape") for d in shape]
    stride = [_nat(s, f"{where}.stride") for s in stride]
    offset, buf = _nat(spec.get("offset"), f"{where}.offset"), buffers[index]
    nbytes = buf.nbytes()
    end = offset + sum((d - 1) * s for d, s in zip(shape, stride)) + 1  # elements up to the last one, inclusive
    numel = 1
    for d in shape:
        numel *= d
    if numel and (end * dtype.itemsize > nbytes or numel * dtype.itemsize > nbytes):
        raise WeightError(
            f"{where} {spec['name']!r}: {dtype} {shape} at offset {offset} overruns its {nbytes}-byte buffer"
        )
    view = torch.empty(0, dtype=dtype, device=buf.device).set_(buf, offset if numel else 0, shape, stride)
    return spec["name"], view


def _decode(payload: str, trusted: bool) -> tuple[Named, dict]:
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError) as e:
        raise WeightError(f"serialized_named_tensors: malformed {FORMAT} JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise WeightError(f"serialized_named_tensors: expected an object with format {FORMAT!r}")
    buffers, tensors = doc.get("buffers"), doc.get("tensors")
    if not isinstance(buffers, list) or not isinstance(tensors, list):
        raise WeightError("serialized_named_tensors: 'buffers' and 'tensors' must be lists")
    opened = [_open_buffer(b, f"buffers[{i}]", trusted) for i, b in enumerate(buffers)]
    return [_view(s, opened, f"tensors[{i}]") for i, s in enumerate(tensors)], doc


# -- SGLang's pickled form, checked (encoder and unpickler: wire_sglang.py) --------------------------------------------
def deserialize_named_tensors(payload: str) -> Named:
    """Inverse of `serialize_named_tensors`, through `TensorUnpickler` (still: only for trusted callers, since
    the tensors it rebuilds point into other processes' memory)."""
    try:
        items = unpickle_tensors(payload)
    except Exception as e:  # noqa: BLE001 - any decoding failure is the caller's bad input
        raise WeightError(f"serialized_named_tensors: cannot decode ({type(e).__name__}: {e})") from e
    if not isinstance(items, list) or not all(
        isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], torch.Tensor) for x in items
    ):
        raise WeightError("serialized_named_tensors: expected a pickled list of (name, tensor) pairs")
    return items


def deserialize_flattened(payload: str) -> tuple[torch.Tensor, list[FlatEntry]]:
    """Inverse of `serialize_flattened` (through `TensorUnpickler`): the shared uint8 buffer and its layout."""
    try:
        obj = unpickle_tensors(payload)
        return _flat_and_entries(obj["flattened_tensor"], obj["metadata"])
    except WeightError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoding failure is the caller's bad input
        raise WeightError(f"serialized_named_tensors: bad flattened bucket ({type(e).__name__}: {e})") from e


# -- the engine's entry points --------------------------------------------------------------------------------------
def _check_form(payload: Any, trusted: bool) -> bool:
    """True for glm_rl.tensors.v1 (JSON), False for a pickle a trusted caller may send; else WeightError."""
    if not isinstance(payload, str):
        raise WeightError("serialized_named_tensors: expected a list of strings")
    if payload.lstrip().startswith("{"):
        return True
    if not trusted:
        raise WeightError(
            f"serialized_named_tensors: pickled payloads are accepted only with the engine's API "
            f"key; send {FORMAT} (JSON)"
        )
    return False


def decode_named_tensors(payload: Any, *, trusted: bool) -> Named:
    """[(name, tensor)] from either form; `trusted`: the caller proved the engine's API key."""
    if not _check_form(payload, trusted):
        return deserialize_named_tensors(payload)
    return _decode(payload, trusted)[0]


def decode_flattened(payload: Any, *, trusted: bool) -> tuple[torch.Tensor, list[FlatEntry]]:
    """(uint8 buffer, layout) of a "flattened_bucket" update from either form (see `decode_named_tensors`)."""
    if not _check_form(payload, trusted):
        return deserialize_flattened(payload)
    named, doc = _decode(payload, trusted)
    if len(named) != 1 or named[0][0] != "flattened_tensor":
        raise WeightError("serialized_named_tensors: a flattened bucket is one tensor named 'flattened_tensor'")
    return _flat_and_entries(named[0][1], doc.get("metadata"))


def _flat_and_entries(flat: Any, layout: Any) -> tuple[torch.Tensor, list[FlatEntry]]:
    """Check a flattened bucket: a 1-D uint8 tensor, and a layout whose every entry lies inside it."""
    if not isinstance(flat, torch.Tensor) or flat.dtype != torch.uint8 or flat.dim() != 1:
        raise WeightError("flattened_tensor: must be a 1-D uint8 tensor")
    try:
        entries = entries_from_json(layout)
        for e in entries:
            dtype = getattr(torch, e.dtype, None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"entry {e.name!r}: unknown dtype {e.dtype!r}")
            if (
                e.offset < 0
                or min(e.shape, default=0) < 0
                or e.offset + math.prod(e.shape) * dtype.itemsize > flat.numel()
            ):
                raise ValueError(
                    f"entry {e.name!r} ({e.dtype} {list(e.shape)} at {e.offset}) outside the {flat.numel()}-byte buffer"
                )
    except (TypeError, ValueError) as e:
        raise WeightError(f"metadata: bad flattened layout ({e})") from None
    return flat, entries


# Re-exported from wire_sglang (callers import both forms' encoders from here).
__all__ = [
    "CHECKSUM_ALGOS",
    "FORMAT",
    "Named",
    "WeightError",
    "checksum_algo",
    "decode_flattened",
    "decode_named_tensors",
    "deserialize_flattened",
    "deserialize_named_tensors",
    "encode_flattened",
    "encode_named_tensors",
    "parse_dtype",
    "serialize_flattened",
    "serialize_named_tensors",
    "shared_copy",
    "tensor_checksum",
]
