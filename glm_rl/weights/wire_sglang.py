"""SGLang's pickled form of a weight update: the encoder and the restricted unpickler that decodes it.

A real SGLang engine takes `update_weights_from_tensor` payloads as base64 of a ForkingPickler pickle
(`serialize_named_tensors` / `serialize_flattened`): CPU tensors in shared memory travel by file name (torch's
"file_system" sharing strategy, set only while pickling), CUDA ones as IPC handles. Our engine decodes such a
pickle only for a trusted caller (`glm_rl.weights.wire`, which checks what comes out), and then only through
`TensorUnpickler`, which resolves nothing but torch's tensor-rebuild functions, so a crafted pickle cannot run code.

Why its own module: the pickle format, its sharing-strategy switch and the unpickler's allow-list are one
security-sensitive piece, reviewed apart from our JSON format (`glm_rl.tensors.v1`, in `wire.py`).
`SHARING_LOCK` lives here because the sharing strategy this module switches is process-global: `wire.py`'s
encoder takes the same lock.
"""

from __future__ import annotations

import base64
import contextlib
import io
import pickle
import threading
from collections.abc import Iterable, Iterator
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch
import torch.multiprocessing  # noqa: F401 - registers the tensor reductions on ForkingPickler

# torch's sharing strategy is process-global and moving a storage into shared memory is not thread-safe: this
# lock keeps concurrent encodings (one thread per engine, often of the same buffer) apart.
SHARING_LOCK = threading.Lock()


@contextlib.contextmanager
def _file_system_sharing() -> Iterator[None]:
    """Use torch's "file_system" sharing strategy while pickling (shared-memory files are named, not fds)."""
    with SHARING_LOCK:
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
    """SGLang's form of [(name, tensor)] (for SGLang engines): keep the tensors alive until it has answered."""
    return _serialize([(str(n), t) for n, t in named_tensors])


def serialize_flattened(flat: torch.Tensor, layout: list[list]) -> str:
    """SGLang-style load_format "flattened_bucket": one uint8 buffer and its layout; keep `flat` alive."""
    return _serialize({"flattened_tensor": flat, "metadata": layout})


_REBUILDERS = {
    ("torch.multiprocessing.reductions", n)
    for n in ("rebuild_tensor", "rebuild_typed_storage", "rebuild_storage_filename", "rebuild_cuda_tensor")
}
_CLASSES = {
    ("torch", "Tensor"),
    ("torch", "Size"),
    ("torch.storage", "UntypedStorage"),
    ("torch.storage", "TypedStorage"),
    ("torch", "UntypedStorage"),
    ("torch.nn.parameter", "Parameter"),
}


class TensorUnpickler(pickle.Unpickler):
    """Resolves only torch's tensor-rebuild functions, tensor / storage / Size classes and dtypes: a pickle that
    names anything else (os.system, builtins.eval, ...) fails before it is called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _REBUILDERS | _CLASSES or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a tensor-rebuild function")


def unpickle_tensors(payload: str) -> Any:
    """base64 pickle → the object, through `TensorUnpickler` (raises whatever base64 / pickle raise)."""
    return TensorUnpickler(io.BytesIO(base64.b64decode(payload, validate=True))).load()
