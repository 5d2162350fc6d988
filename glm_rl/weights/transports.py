"""Weight transports: push the trainer's named tensors to every engine, versioned and verifiable.

- `tensor` (colocated): each bucket is copied once into shared memory (CPU; CUDA IPC handles on GPU) and its
  handles are posted to every engine, which copies straight into its parameters; the shared copy is freed
  after the bucket.
- `broadcast`: a gloo group of the trainer's source rank (rank 0) and one rank per engine. Per bucket, every
  engine is told the (names, dtypes, shapes) over HTTP, then the source broadcasts each tensor in order.

Both end the same way: with `verify`, every engine's sha256 of every tensor is compared with the source's.
The transport runs inside trainer rank 0 (a full replica under data parallelism).
"""

from __future__ import annotations

import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch

from glm_rl.rollout.engines.client import EngineClient, create_weight_group, tensor_checksum
from glm_rl.weights.bucketing import iter_buckets

Named = list[tuple[str, torch.Tensor]]
log = logging.getLogger(__name__)


class WeightTransport(Protocol):
    def prepare(self) -> None: ...
    def push(self, named: Named, version: int, verify: bool) -> dict: ...
    def close(self) -> None: ...


class _Base:
    def __init__(self, engine_urls: list[str], api_key: str | None, bucket_bytes: int) -> None:
        self.clients = [EngineClient(u, api_key=api_key, timeout=600) for u in engine_urls]
        self.bucket_bytes = bucket_bytes
        self.pool = ThreadPoolExecutor(max_workers=max(2, len(self.clients)))

    def prepare(self) -> None:
        pass

    def close(self) -> None:
        self.pool.shutdown(wait=False)

    def _each(self, fn) -> list:
        return [f.result() for f in [self.pool.submit(fn, c) for c in self.clients]]

    def verify(self, named: Named, version: int) -> bool:
        """Every engine holds bitwise the source's tensors (sha256 per tensor) at `version`."""
        expected = {n: tensor_checksum(t) for n, t in named}
        for answer in self._each(lambda c: c.weights_checksum(list(expected))):
            if answer["weight_version"] != version or answer["checksums"] != expected:
                bad = [n for n, h in expected.items() if answer["checksums"].get(n) != h]
                raise RuntimeError(f"weight sync v{version}: engine differs on {len(bad)} tensors, e.g. {bad[:3]} "
                                   f"(engine version {answer['weight_version']})")
        return True

    def _finish(self, named: Named, version: int, verify: bool, t0: float) -> dict:
        nbytes = sum(t.numel() * t.element_size() for _, t in named)
        verified = self.verify(named, version) if verify else False
        return {"verified": verified, "bytes": nbytes, "tensors": len(named), "seconds": time.time() - t0}


class TensorTransport(_Base):
    def push(self, named: Named, version: int, verify: bool) -> dict:
        t0 = time.time()
        buckets = list(iter_buckets(named, self.bucket_bytes))
        for i, bucket in enumerate(buckets):
            shared = [(n, t.detach().clone().share_memory_()) for n, t in bucket]  # freed after the bucket
            last = i == len(buckets) - 1
            self._each(lambda c: c.update_weights_from_tensor(shared, weight_version=version if last else None,
                                                              flush_cache=last))
            del shared
        return self._finish(named, version, verify, t0)


class BroadcastTransport(_Base):
    group_name = "glm_rl_weights"

    def prepare(self) -> None:
        """Build the group: engines join over HTTP (threads) while this rank hosts it as rank 0."""
        port = _free_port()
        world = 1 + len(self.clients)
        joins = [self.pool.submit(c.init_weights_update_group, "127.0.0.1", port, 1 + i, world, self.group_name)
                 for i, c in enumerate(self.clients)]
        self.group = create_weight_group("127.0.0.1", port, rank=0, world_size=world, group_name=self.group_name)
        for j in joins:
            j.result()

    def push(self, named: Named, version: int, verify: bool) -> dict:
        t0 = time.time()
        buckets = list(iter_buckets(named, self.bucket_bytes))
        for i, bucket in enumerate(buckets):
            last = i == len(buckets) - 1
            names = [n for n, _ in bucket]
            dtypes = [str(t.dtype) for _, t in bucket]
            shapes = [list(t.shape) for _, t in bucket]
            pending = [self.pool.submit(c.update_weights_from_distributed, names, dtypes, shapes, self.group_name,
                                        version if last else None, last) for c in self.clients]
            for _, t in bucket:
                self.group.broadcast(t.detach().to("cpu").contiguous())
            for p in pending:
                p.result()
        return self._finish(named, version, verify, t0)

    def close(self) -> None:
        """Leave the group on every engine still alive (a dead one is being replaced)."""
        for c in self.clients:
            try:
                c.destroy_weights_update_group(self.group_name)
            except Exception as e:
                log.warning("destroying the weight group on %s failed: %s", c.url, e)
        super().close()


def make_transport(mode: str, engine_urls: list[str], api_key: str | None, bucket_bytes: int) -> WeightTransport:
    match mode:
        case "tensor":
            return TensorTransport(engine_urls, api_key, bucket_bytes)
        case "broadcast":
            return BroadcastTransport(engine_urls, api_key, bucket_bytes)
        case _:
            raise ValueError(f"unknown --update-weight-transfer-mode {mode!r}; valid: tensor, broadcast")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
