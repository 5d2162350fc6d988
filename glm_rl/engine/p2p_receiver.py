"""Engine side of P2P weight sync: one receive buffer, registered with this engine's Mooncake TransferEngine.

Protocol (routes in `http_server.py`; the trainer side is `glm_rl/weights/p2p.py`):
1. `POST /p2p/prepare {"protocol": "tcp", "buffer_bytes": N, "tensors": [{"name", "dtype", "shape", "box",
   "offset", "nbytes"}, ...]}`: the pieces of the transfer plan this engine rank receives (`box` in
   full-tensor coordinates, `offset` into the buffer). The engine checks every piece against its weights (name,
   shape, dtype, bounds, full coverage of each tensor), allocates ONE contiguous CPU buffer of N bytes,
   registers it, and answers `{"session_id", "buffer_ptr", "buffer_bytes"}`. Preparing again with the same
   layout keeps the buffer; a new layout replaces it.
2. Sources write their pieces straight into the buffer (one-sided writes; the engine's Python is not involved).
3. `POST /p2p/commit {"weight_version": v}`: every tensor is viewed (one piece) or assembled (several) from the
   buffer and loaded through `EngineWeights.load` (`weights.py`), as the other transports do — so the version
   bump and `/weights_checksum` behave the same. The buffer stays registered for the next sync.
4. `POST /p2p/close`: unregister and free the buffer.

Why a staging buffer and not the parameters themselves: the parameters must not change while a batch decodes
(writes are one-sided and would land mid-forward); commit swaps them in under the model lock. On GPU, with
SGLang's weight loaders, the same buffer would hold the pieces in the engine's TP layout.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import torch

from glm_rl.ray.addresses import node_ip
from glm_rl.weights.mooncake import new_transfer_engine
from glm_rl.weights.wire import WeightError, parse_dtype

Load = Callable[[list[tuple[str, torch.Tensor]], int | None], dict[str, Any]]


class P2PReceiver:
    """One engine's receive buffer: `state` are the engine's named weights (checked against, never written
    here); `load(named, weight_version)` swaps a commit in (`EngineWeights.load`)."""

    def __init__(self, state: dict[str, torch.Tensor], load: Load, host: str) -> None:
        self.state, self.load = state, load
        self.host = node_ip() if host in ("", "0.0.0.0") else host  # an address other nodes reach
        self._lock = threading.Lock()
        self._te = None
        self._protocol: str | None = None
        self._buffer: torch.Tensor | None = None
        self._layout: list[dict] | None = None
        self._pieces: dict[str, list[tuple[tuple[tuple[int, int], ...], int, int]]] = {}

    def _transfer_engine(self, protocol: str):
        if self._te is None:
            self._te, self._protocol = new_transfer_engine(self.host, protocol), protocol
        elif protocol != self._protocol:
            raise ValueError(f"protocol: this engine's TransferEngine already runs {self._protocol!r}")
        return self._te

    def prepare(self, tensors: list[dict], buffer_bytes: int, protocol: str = "tcp") -> dict[str, Any]:
        pieces = _validate(self.state, tensors, buffer_bytes)
        with self._lock:
            te = self._transfer_engine(protocol)
            if self._layout != tensors or self._buffer is None or self._buffer.numel() != buffer_bytes:
                self._release()
                buf = torch.zeros(max(buffer_bytes, 1), dtype=torch.uint8)
                if te.register_memory(buf.data_ptr(), buf.numel()) != 0:
                    raise RuntimeError(f"Mooncake register_memory of {buf.numel()} bytes failed")
                self._buffer, self._layout, self._pieces = buf, tensors, pieces
            return {
                "success": True,
                "session_id": f"{self.host}:{te.get_rpc_port()}",
                "buffer_ptr": self._buffer.data_ptr(),
                "buffer_bytes": self._buffer.numel(),
                "num_tensors": len(pieces),
            }

    def commit(self, weight_version: int | None) -> dict[str, Any]:
        with self._lock:
            if self._buffer is None:
                raise WeightError("p2p commit before /p2p/prepare")
            named = [(name, self._tensor(name, plist)) for name, plist in self._pieces.items()]
            return self.load(named, weight_version)

    def _tensor(self, name: str, pieces: list) -> torch.Tensor:
        target = self.state[name]
        full = tuple((0, d) for d in target.shape)
        views = [
            (box, self._buffer[off : off + n].view(target.dtype).view([b - a for a, b in box]))
            for box, off, n in pieces
        ]
        if len(views) == 1 and views[0][0] == full:
            return views[0][1]
        out = torch.empty_like(target)
        for box, view in views:
            out[tuple(slice(a, b) for a, b in box)] = view
        return out

    def _release(self) -> None:
        if self._buffer is not None and self._te is not None:
            self._te.unregister_memory(self._buffer.data_ptr())
        self._buffer, self._layout, self._pieces = None, None, {}

    def close(self) -> dict[str, Any]:
        with self._lock:
            self._release()
        return {"success": True, "message": "p2p buffer released"}


def _validate(state: dict[str, torch.Tensor], tensors: Any, buffer_bytes: Any) -> dict[str, list]:
    """{name: [(box, offset, nbytes)]} after checking each piece against the engine's weights."""
    if not isinstance(buffer_bytes, int) or buffer_bytes < 0:
        raise WeightError(f"buffer_bytes: expected a non-negative int, got {buffer_bytes!r}")
    if not isinstance(tensors, list):
        raise WeightError("tensors: expected a list of pieces")
    pieces: dict[str, list] = {}
    for i, p in enumerate(tensors):
        name = p.get("name") if isinstance(p, dict) else None
        if name not in state:
            raise WeightError(f"tensors[{i}]: unknown weight name {name!r}")
        target = state[name]
        if list(p.get("shape", [])) != list(target.shape) or parse_dtype(p.get("dtype", "?")) != target.dtype:
            raise WeightError(
                f"tensors[{i}] {name!r}: {p.get('dtype')} {p.get('shape')} does not match the "
                f"engine's {target.dtype} {list(target.shape)}"
            )
        box = tuple(tuple(r) for r in p.get("box", ()))
        if len(box) != target.dim() or not all(0 <= a < b <= d for (a, b), d in zip(box, target.shape)):
            raise WeightError(f"tensors[{i}] {name!r}: box {p.get('box')} outside shape {list(target.shape)}")
        nbytes = math.prod(b - a for a, b in box) * target.element_size()
        off = p.get("offset")
        if p.get("nbytes") != nbytes or not isinstance(off, int) or off < 0 or off + nbytes > buffer_bytes:
            raise WeightError(
                f"tensors[{i}] {name!r}: offset {off} + nbytes {p.get('nbytes')} (expected "
                f"{nbytes}) outside the {buffer_bytes}-byte buffer"
            )
        pieces.setdefault(name, []).append((box, off, nbytes))
    for name, plist in pieces.items():
        if sum(n for _, _, n in plist) != state[name].numel() * state[name].element_size():
            raise WeightError(
                f"{name!r}: pieces cover {sum(n for _, _, n in plist)} of "
                f"{state[name].numel() * state[name].element_size()} bytes (this engine has one TP "
                f"rank)"
            )
    return pieces
