"""Weight transports: push the trainer's named tensors to every engine, versioned and verifiable.

- `tensor` (colocated): each bucket is copied once into shared memory (CPU; CUDA IPC handles on GPU) and its
  handles are posted to every engine, which copies straight into its parameters; the shared copy is freed
  after the bucket.
- `broadcast`: a gloo group of the trainer's source rank (rank 0) and one rank per engine. Per bucket, every
  engine is told the (names, dtypes, shapes) over HTTP, then the source broadcasts each tensor in order.

Both end the same way: with `verify`, every engine's sha256 of every tensor is compared with the source's.
The transport runs inside trainer rank 0 (a full replica under data parallelism).

`fp8` (`--rollout-fp8`: BF16 / FP32 training, FP8 rollout): each bucket's linear weights are sent block-quantized
(float8_e4m3fn + `<name>_scale_inv`, `models/fp8.py`; raw bytes over gloo) and engines dequantize them on load.
Verification then expects, for those tensors, the dequantization of the very bytes sent, in the source dtype.

`BaseTransport` holds what every transport shares (clients, thread pool, fp8 wire form, verification); the third
transport, `p2p`, builds on it in `p2p.py`, and `modes.make_transport` picks one per
`--update-weight-transfer-mode`.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch

from glm_rl.models.fp8 import dequantize_named, gloo_view, quantize_named
from glm_rl.ray.addresses import free_port, node_ip
from glm_rl.rollout.engine_client import EngineClient
from glm_rl.weights.bucketing import iter_buckets
from glm_rl.weights.flat import entries_to_json
from glm_rl.weights.group import create_weight_group
from glm_rl.weights.wire import shared_copy, tensor_checksum

Named = list[tuple[str, torch.Tensor]]
log = logging.getLogger(__name__)


class WeightTransport(Protocol):
    def prepare(self) -> None: ...
    def push(self, named: Named, version: int, verify: bool) -> dict: ...
    def close(self) -> None: ...


class BaseTransport:
    """What every transport shares: one client per engine, a thread pool, the fp8 wire form, verification."""

    def __init__(self, engine_urls: list[str], api_key: str | None, bucket_bytes: int, fp8: bool = False) -> None:
        self.clients = [EngineClient(u, api_key=api_key, timeout=600) for u in engine_urls]
        self.bucket_bytes = bucket_bytes
        self.fp8 = fp8
        self.pool = ThreadPoolExecutor(max_workers=max(2, len(self.clients)))

    def prepare(self) -> None:
        pass

    def close(self) -> None:
        self.pool.shutdown(wait=False)

    def _each(self, fn) -> list:
        return [f.result() for f in [self.pool.submit(fn, c) for c in self.clients]]

    def verify(self, named: Named, version: int, expected: dict[str, str] | None = None) -> bool:
        """Every engine holds bitwise the source's tensors (sha256 per tensor; `expected` when given) at `version`."""
        expected = expected or {n: tensor_checksum(t) for n, t in named}
        for answer in self._each(lambda c: c.weights_checksum(list(expected))):
            if answer["weight_version"] != version or answer["checksums"] != expected:
                bad = [n for n, h in expected.items() if answer["checksums"].get(n) != h]
                raise RuntimeError(f"weight sync v{version}: engine differs on {len(bad)} tensors, e.g. {bad[:3]} "
                                   f"(engine version {answer['weight_version']})")
        return True

    def _to_wire(self, bucket: Named, held: dict[str, str]) -> Named:
        """The bucket as sent. With fp8, quantizable weights become (float8, scale) pairs and `held` gets the
        checksum of what each engine must then hold: those bytes dequantized into the source dtype."""
        if not self.fp8:
            return bucket
        wire = quantize_named((n, t.detach()) for n, t in bucket)  # on the trainer's device
        dtypes = {n: t.dtype for n, t in bucket}
        held.update((n, tensor_checksum(t)) for n, t in dequantize_named(wire, dtypes.__getitem__))
        return wire

    def _finish(self, named: Named, version: int, verify: bool, t0: float, held: dict[str, str] | None = None) -> dict:
        nbytes = sum(t.numel() * t.element_size() for _, t in named)
        verified = self.verify(named, version, held) if verify else False
        return {"verified": verified, "bytes": nbytes, "tensors": len(named), "seconds": time.time() - t0}


class TensorTransport(BaseTransport):
    flat = None  # (buffer, layout) when the trainer's weights are flattened: one handle for the whole model

    def push(self, named: Named, version: int, verify: bool) -> dict:
        t0, held = time.time(), {}
        if self.flat is not None and not self.fp8:
            flat, entries = self.flat
            layout = entries_to_json(entries)
            self._each(lambda c: c.update_weights_from_flat(flat, layout, weight_version=version))
            return self._finish(named, version, verify, t0, held)
        buckets = list(iter_buckets(named, self.bucket_bytes))
        for i, bucket in enumerate(buckets):
            bucket = self._to_wire(bucket, held)
            shared = [(n, _shareable(t)) for n, t in bucket]  # CPU copies are freed after the bucket
            last = i == len(buckets) - 1
            self._each(lambda c: c.update_weights_from_tensor(shared, weight_version=version if last else None,
                                                              flush_cache=last))
            del shared
        return self._finish(named, version, verify, t0, held)


class BroadcastTransport(BaseTransport):
    group_name = "glm_rl_weights"

    def prepare(self) -> None:
        """Build the group: engines join over HTTP (threads) while this rank hosts it as rank 0."""
        host = node_ip()  # this (source) rank's node: engines on other nodes connect to it
        port = free_port(host)
        world = 1 + len(self.clients)
        joins = [self.pool.submit(c.init_weights_update_group, host, port, 1 + i, world, self.group_name)
                 for i, c in enumerate(self.clients)]
        self.group = create_weight_group(host, port, rank=0, world_size=world, group_name=self.group_name)
        for j in joins:
            j.result()

    def push(self, named: Named, version: int, verify: bool) -> dict:
        t0, held = time.time(), {}
        buckets = list(iter_buckets(named, self.bucket_bytes))
        for i, bucket in enumerate(buckets):
            last = i == len(buckets) - 1
            bucket = self._to_wire(bucket, held)
            names = [n for n, _ in bucket]
            dtypes = [str(t.dtype) for _, t in bucket]
            shapes = [list(t.shape) for _, t in bucket]
            pending = [self.pool.submit(c.update_weights_from_distributed, names, dtypes, shapes, self.group_name,
                                        version if last else None, last) for c in self.clients]
            for _, t in bucket:
                self.group.broadcast(gloo_view(t.detach().to("cpu").contiguous()))
            for p in pending:
                p.result()
        return self._finish(named, version, verify, t0, held)

    def close(self) -> None:
        """Leave the group on every engine still alive (a dead one is being replaced)."""
        for c in self.clients:
            try:
                c.destroy_weights_update_group(self.group_name)
            except Exception as e:
                log.warning("destroying the weight group on %s failed: %s", c.url, e)
        super().close()


def _shareable(t: torch.Tensor) -> torch.Tensor:
    """CUDA: the tensor itself travels as an IPC handle (no copy; the trainer does not write it during the
    sync). CPU: one copy, into named shared memory (`wire.shared_copy`), so the trainer's own storage never
    moves."""
    return t.detach() if t.is_cuda else shared_copy(t)

