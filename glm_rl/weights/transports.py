"""Weight transports: push the trainer's named tensors to every engine, versioned and verifiable.

- `tensor` (colocated): each bucket is copied once into shared memory (CPU; CUDA IPC handles on GPU) and its
  handles are posted to every engine, which copies straight into its parameters; the shared copy is freed
  after the bucket.
- `broadcast`: a torch.distributed group of the trainer's source rank (rank 0) and one rank per engine — NCCL
  when they are on GPUs of their own (`backend`, chosen by the trainer group), gloo on CPUs and when engines
  share the trainer's GPU. Per bucket, every engine is told the (names, dtypes, shapes) over HTTP, then the
  source broadcasts each tensor in order (over NCCL straight from its GPU copy).

Both take a list or a stream of (name, tensor) and send bucket by bucket, so a source holds one bucket beyond its
model (megatron's export gathers TP / EP shards as it yields). Both end the same way: with `verify`, every
engine's digest of every tensor is compared with the one the source took before sending. A transport runs in
each source rank: trainer rank 0 (a full replica under data parallelism), or under pipeline parallelism one rank
per stage sending that stage's tensors through a group of its own — then each verifies later
(`defer_verify`, `verify_pushed`), once every stage has pushed.

`fp8` (`--rollout-fp8`: BF16 / FP32 training, FP8 rollout): each bucket's linear weights are sent block-quantized
(float8_e4m3fn + `<name>_scale_inv`, `models/fp8.py`; raw bytes over gloo) and engines dequantize them on load.
Verification then expects, for those tensors, the dequantization of the very bytes sent, in the source dtype.

`BaseTransport` holds what every transport shares (clients, thread pool, fp8 wire form, verification); the third
transport, `p2p`, builds on it in `p2p.py`, and `modes.make_transport` picks one per
`--update-weight-transfer-mode`.

An engine that dies during a sync (`liveness.py`): a failed call makes the transport probe every engine's /health;
the silent ones are marked dead and skipped from then on, and `push` reports them (`"dead"`: their indices) so
the runtime restarts them and pushes again. `tensor` finishes the sync on the others (each engine loads on its
own); `broadcast` builds its group again without the dead engine and sends the bucket again (the live engines
hold the earlier ones); verification covers the live engines. A failure while every engine still answers is
raised as it is.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

from glm_rl.models.fp8 import dequantize_named, gloo_view, quantize_named
from glm_rl.ray.addresses import free_port, node_ip
from glm_rl.rollout.engine_client import EngineClient
from glm_rl.weights.bucketing import iter_buckets
from glm_rl.weights.flat import entries_to_json
from glm_rl.weights.group import create_weight_group
from glm_rl.weights.liveness import abandon, first_failure, in_thread, probe_dead, wait_work
from glm_rl.weights.wire import checksum_algo, shared_copy, tensor_checksum

NamedTensor = tuple[str, torch.Tensor]
Named = list[NamedTensor]
log = logging.getLogger(__name__)


class WeightTransport(Protocol):
    def prepare(self) -> None: ...
    def push(
        self, named: Iterable[tuple[str, torch.Tensor]], version: int, verify: bool, defer_verify: bool = False
    ) -> dict: ...
    def verify_pushed(self, version: int) -> bool: ...
    def close(self) -> None: ...


@dataclass
class Tally:
    """What a push has sent so far: tensors, bytes, and the digest each engine must hold per tensor."""

    count: int = 0
    nbytes: int = 0
    held: dict[str, str] = field(default_factory=dict)
    digest_s: float = 0.0  # the source's side of verification: its digests


class BaseTransport:
    """What every transport shares: one client per engine, a thread pool, the fp8 wire form, verification."""

    def __init__(self, engine_urls: list[str], api_key: str | None, bucket_bytes: int, fp8: bool = False) -> None:
        self.clients = [EngineClient(u, api_key=api_key, timeout=600) for u in engine_urls]
        self.bucket_bytes = bucket_bytes
        self.fp8 = fp8
        self.pool = ThreadPoolExecutor(max_workers=max(2, len(self.clients)))
        self.dead: set[int] = set()  # engines found dead: skipped from then on, reported by push ("dead")

    def prepare(self) -> None:
        pass

    def close(self) -> None:
        self.pool.shutdown(wait=False)

    def live(self) -> list[int]:
        return [i for i in range(len(self.clients)) if i not in self.dead]

    def _each(self, fn) -> list:
        """fn(client) on every live engine at once; the results in engine order."""
        return [f.result() for f in [self.pool.submit(fn, self.clients[i]) for i in self.live()]]

    def _each_surviving(self, fn) -> None:
        """fn(client) on every live engine at once; when calls fail, the engines found dead are marked and
        skipped (`mark_dead`), and a failure with no engine dead is raised."""
        errors = [
            e
            for e in (f.exception() for f in [self.pool.submit(fn, self.clients[i]) for i in self.live()])
            if e is not None
        ]
        if errors:
            self.mark_dead(errors[0])

    def mark_dead(self, error: BaseException) -> list[int]:
        """After `error`: the live engines that no longer answer /health are marked dead and returned; `error`
        is raised when every engine still answers (then it is no death)."""
        dead = probe_dead({i: self.clients[i].url for i in self.live()})
        if not dead:
            raise error
        for i in dead:
            log.warning(
                "engine %s died during the weight sync (%s): going on without it",
                self.clients[i].url,
                (str(error).strip().splitlines() or [type(error).__name__])[0][:200],
            )
        self.dead.update(dead)
        return dead

    def verify(self, named: Named, version: int, expected: dict[str, str] | None = None) -> bool:
        """Every engine holds bitwise the source's tensors (a digest per tensor; `expected` when given) at `version`.
        CUDA sources use the device digest (`d128`, 16 bytes per tensor leave the GPU) on both ends, else sha256."""
        algo = checksum_algo(t for _, t in named)
        expected = expected or {n: tensor_checksum(t, algo) for n, t in named}
        if any(h.startswith("d128:") for h in expected.values()):
            algo = "d128"
        for answer in self._each(lambda c: c.weights_checksum(list(expected), algo)):
            if answer["weight_version"] != version or answer["checksums"] != expected:
                bad = [n for n, h in expected.items() if answer["checksums"].get(n) != h]
                raise RuntimeError(
                    f"weight sync v{version}: engine differs on {len(bad)} tensors, e.g. {bad[:3]} "
                    f"(engine version {answer['weight_version']})"
                )
        return True

    def _to_wire(self, bucket: Named, held: dict[str, str]) -> Named:
        """The bucket as sent. With fp8, quantizable weights become (float8, scale) pairs and `held` gets the
        checksum of what each engine must then hold: those bytes dequantized into the source dtype."""
        if not self.fp8:
            return bucket
        wire = quantize_named((n, t.detach()) for n, t in bucket)  # on the trainer's device
        dtypes = {n: t.dtype for n, t in bucket}
        algo = checksum_algo(t for _, t in bucket)
        held.update((n, tensor_checksum(t, algo)) for n, t in dequantize_named(wire, dtypes.__getitem__))
        return wire

    def _expect(self, bucket: Named, tally: Tally, verify: bool) -> None:
        """Record in `tally.held` the digest each engine must hold for `bucket`'s tensors, taken before they are
        sent (a streamed sync keeps these 16–64 bytes per tensor, not the tensors). fp8 buckets are recorded by
        `_to_wire`."""
        if verify and not self.fp8:
            t0, algo = time.time(), checksum_algo(t for _, t in bucket)
            tally.held.update((n, tensor_checksum(t, algo)) for n, t in bucket)
            tally.digest_s += time.time() - t0

    def _finish(self, tally: Tally, version: int, verify: bool, t0: float, defer_verify: bool = False) -> dict:
        """The push's result, verifying every live engine (now, or with `defer_verify` later by
        `verify_pushed`: another source's push is still writing the same engines)."""
        self.expected = tally.held
        verified, t_verify = False, time.time()
        if verify and not defer_verify:
            verified = self.verify_pushed(version)
        return {
            "verified": verified,
            "bytes": tally.nbytes,
            "tensors": tally.count,
            "seconds": time.time() - t0,
            "verify_seconds": tally.digest_s + time.time() - t_verify,  # both sides' digests, the comparison
            "dead": sorted(self.dead),
        }

    def verify_pushed(self, version: int) -> bool:
        """Verify what the last push sent (its digests; taken before sending), now or once every source has
        pushed. An engine dying meanwhile is marked dead and the others verified."""
        while self.live():
            try:
                return self.verify([], version, self.expected)
            except Exception as e:  # noqa: BLE001 - mark_dead raises it again unless an engine died
                self.mark_dead(e)
        return False

    def _buckets(self, named: Iterable[tuple[str, torch.Tensor]], tally: Tally) -> Iterator[tuple[Named, bool]]:
        """(bucket, is it the last) over a list or a stream of tensors (a collective export yields them one by
        one: at most one bucket is held), counted into `tally`."""
        pending = None
        for bucket in iter_buckets(named, self.bucket_bytes):
            tally.count += len(bucket)
            tally.nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            if pending is not None:
                yield pending, False
            pending = bucket
        if pending is not None:
            yield pending, True

    def _tally(self, named: Iterable[NamedTensor], verify: bool) -> Tally:
        """Counted (and with `verify` digested) tensors that reached the engines otherwise than bucket by bucket
        through this transport (one flat buffer, P2P writes)."""
        tally = Tally()
        for bucket, _ in self._buckets(named, tally):
            self._expect(bucket, tally, verify)
        return tally


class TensorTransport(BaseTransport):
    flat = None  # (buffer, layout) when the trainer's weights are flattened: one handle for the whole model

    def push(self, named: Iterable[NamedTensor], version: int, verify: bool, defer_verify: bool = False) -> dict:
        t0 = time.time()
        if self.flat is not None and not self.fp8:
            flat, entries = self.flat
            layout = entries_to_json(entries)
            self._each_surviving(lambda c: c.update_weights_from_flat(flat, layout, weight_version=version))
            return self._finish(self._tally(named, verify), version, verify, t0, defer_verify)
        tally = Tally()
        for bucket, last in self._buckets(named, tally):
            self._expect(bucket, tally, verify)
            bucket = self._to_wire(bucket, tally.held)
            shared = [(n, _shareable(t)) for n, t in bucket]  # CPU copies are freed after the bucket
            self._each_surviving(
                lambda c, shared=shared, last=last: c.update_weights_from_tensor(
                    shared, weight_version=version if last else None, flush_cache=last
                )
            )
            del shared
        return self._finish(tally, version, verify, t0, defer_verify)


class BroadcastTransport(BaseTransport):
    backend = "gloo"  # or "nccl" (`weights.group.BACKENDS`), set by make_transport
    group_timeout_s = 60.0  # the source's side of the group (join and each operation)
    group_name = ""  # a new name per group built: a join of an abandoned one may still run on an engine
    group = None

    def prepare(self) -> None:
        """Build the group of this (source) rank and the live engines; an engine that dies before it is complete
        is marked dead and the group built again without it."""
        for _ in range(len(self.clients) + 1):
            try:
                self._build_group()
                return
            except Exception as e:  # noqa: BLE001 - mark_dead raises it again unless an engine died
                self.mark_dead(e)
                self._abandon_group()
        raise RuntimeError("broadcast weight group: engines kept dying while it was built")

    def _build_group(self) -> None:
        """Engines join over HTTP (own threads) while this rank hosts the group as rank 0; the first failure
        ends the wait."""
        host = node_ip()  # this (source) rank's node: engines on other nodes connect to it
        port = free_port(host)
        live = self.live()
        world = 1 + len(live)
        self.group_name = f"glm_rl_weights_{secrets.token_hex(4)}"
        joins = [
            in_thread(
                self.clients[i].init_weights_update_group, host, port, 1 + k, world, self.group_name, self.backend
            )
            for k, i in enumerate(live)
        ]
        source = in_thread(
            create_weight_group,
            host,
            port,
            rank=0,
            world_size=world,
            group_name=self.group_name,
            backend=self.backend,
            timeout_s=self.group_timeout_s,
        )
        self.group = first_failure([source, *joins])[0]

    def push(self, named: Iterable[NamedTensor], version: int, verify: bool, defer_verify: bool = False) -> dict:
        """Send bucket by bucket (`named` may be a stream); when an engine dies on the way, build the group
        without it and send that bucket again: the live engines hold every earlier one."""
        t0, tally = time.time(), Tally()
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        for bucket, last in self._buckets(named, tally):
            self._expect(bucket, tally, verify)
            bucket = self._to_wire(bucket, tally.held)
            for _ in range(len(self.clients) + 1):
                try:
                    self._send(bucket, version if last else None, last, opts)
                    break
                except Exception as e:  # noqa: BLE001 - mark_dead raises it again unless an engine died
                    self.mark_dead(e)
                    self._abandon_group()
                    self.prepare()
            else:
                raise RuntimeError(f"weight sync v{version}: engines kept dying during the broadcast")
        return self._finish(tally, version, verify, t0, defer_verify)

    def _send(self, bucket: Named, version: int | None, last: bool, opts) -> None:
        """One bucket: its (names, dtypes, shapes) to every live engine over HTTP, then each tensor broadcast in
        order (over NCCL straight from its GPU copy)."""
        names = [n for n, _ in bucket]
        dtypes = [str(t.dtype) for _, t in bucket]
        shapes = [list(t.shape) for _, t in bucket]
        pending = [
            in_thread(
                self.clients[k].update_weights_from_distributed, names, dtypes, shapes, self.group_name, version, last
            )
            for k in self.live()
        ]
        for _, t in bucket:  # each broadcast also ends when an engine's receive fails (liveness.wait_work)
            wire = gloo_view(t.detach().to(self.group.device).contiguous())
            wait_work(self.group.pg.broadcast([wire], opts), pending)
        first_failure(pending)

    def _abandon_group(self) -> None:
        """Leave the current group after a failure: engines destroy their side (best effort), this side is kept
        until its stuck operations time out (liveness.abandon)."""
        for f in [in_thread(self.clients[i].destroy_weights_update_group, self.group_name) for i in self.live()]:
            try:
                f.result(timeout=10)
            except Exception:  # noqa: BLE001 - an engine that never joined, or one being replaced
                pass
        if self.group is not None and self.group.backend == "nccl":
            self.group.close()  # NCCL: abort now (a stuck collective never times out on its own terms)
        else:
            abandon(self.group, self.group_timeout_s)
        self.group = None

    def close(self) -> None:
        """Leave the group on every engine still alive (a dead one is being replaced)."""
        for i in self.live():
            try:
                self.clients[i].destroy_weights_update_group(self.group_name)
            except Exception as e:
                log.warning("destroying the weight group on %s failed: %s", self.clients[i].url, e)
        if self.group is not None:
            self.group.close()  # NCCL: abort the communicator (a gloo group has nothing to abort)
        abandon(None, 0.0)  # drop the groups abandoned long enough ago
        super().close()


def _shareable(t: torch.Tensor) -> torch.Tensor:
    """CUDA: the tensor itself travels as an IPC handle (no copy; the trainer does not write it during the
    sync). CPU: one copy, into named shared memory (`wire.shared_copy`), so the trainer's own storage never
    moves."""
    return t.detach() if t.is_cuda else shared_copy(t)
