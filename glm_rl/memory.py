"""Device memory a colocated process gives up while the other side of the GPU works, and takes back in place.

Why storages, not tensors: parameters, their flat buffer (`weights/flat.py`), optimizer state and every view of
them must keep their identity (the optimizer, hooks and shared-buffer layouts hold references), so the memory
under them is moved instead: each storage is copied to pinned host memory and resized to zero bytes (its device
memory goes back to the allocator; `release` then returns it to the driver so the other process can use it), and
`restore` resizes it back and copies the bytes in. The storage's device address changes: CUDA graphs that
captured it must be captured again, and CUDA IPC handles taken earlier are stale (the weight transports take a
fresh handle at every push). `keep_contents=False` frees without a host copy, for memory that is rewritten before
it is read again (an engine's weights, overwritten by the next weight sync, as SGLang's memory saver does without
`--enable-weights-cpu-backup`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _byte_view(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class HostOffload:
    """The distinct storages under `tensors`, moved to the host (`release`) and back (`restore`)."""

    def __init__(self, tensors: Iterable[torch.Tensor], *, keep_contents: bool = True) -> None:
        seen: dict[int, torch.UntypedStorage] = {}
        for t in tensors:
            storage = t.untyped_storage()
            seen.setdefault(storage._cdata, storage)
        self.storages = list(seen.values())
        self.sizes = [s.nbytes() for s in self.storages]
        self.keep_contents = keep_contents
        self.on_gpu = any(s.device.type == "cuda" for s in self.storages)  # then synchronise and free to the driver
        self.host: list[torch.Tensor] | None = None  # pinned copies while released
        self.released = False

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)

    def release(self) -> None:
        """Copy each storage to host memory (pinned for device storages; none with `keep_contents` off) and free
        its memory; device memory goes back to the driver."""
        if self.released:
            return
        if self.keep_contents:
            self.host = []
            for s in self.storages:
                pin = s.device.type == "cuda"
                host = torch.empty(s.nbytes(), dtype=torch.uint8, pin_memory=pin)
                host.copy_(_byte_view(s), non_blocking=pin)
                self.host.append(host)
            if self.on_gpu:
                torch.cuda.synchronize()  # the copies finish before the memory goes
        for s in self.storages:
            s.resize_(0)
        self.released = True
        if self.on_gpu:
            torch.cuda.ipc_collect()  # blocks another process opened by CUDA IPC and has let go of
            torch.cuda.empty_cache()

    def restore(self) -> None:
        """Give every storage its size back and, with `keep_contents`, its bytes."""
        if not self.released:
            return
        for i, (s, n) in enumerate(zip(self.storages, self.sizes)):
            s.resize_(n)
            if self.host is not None:
                _byte_view(s).copy_(self.host[i], non_blocking=s.device.type == "cuda")
        if self.on_gpu:
            torch.cuda.synchronize()
        self.host, self.released = None, False


def reserved_gib() -> float:
    """This process's reserved device memory in GiB (0 without CUDA): what a phase still holds."""
    return torch.cuda.memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0
