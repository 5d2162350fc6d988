"""P2P weight sync: every trainer rank writes its share of the weights straight into engine memory (Mooncake).

Why: gather-to-rank-0-then-broadcast makes one rank's link the bottleneck; here the transfer plan
(`weights/transfer_plan.py`) spreads the bytes over every trainer rank (sources) and every engine rank (destinations).

One sync (`push`, run on EVERY trainer rank at once; `TrainerGroup.push_weights` does that):
1. First push (or when the tensors change): every rank builds the same plan from the tensor metadata (names,
   shapes, the engines' dtype), the source layout (torch backend: every rank a full replica) and each engine's
   layout (`/server_info` tp_size). Rank 0 posts each engine its pieces (`POST /p2p/prepare`, see
   `engine/p2p_receiver.py`); the engine registers one receive buffer and answers its Mooncake session
   id and buffer address, which rank 0 broadcasts to the other ranks over the trainer's process group.
2. Each rank packs its pieces bucket by bucket into one registered staging buffer (cast to the engine dtype) and
   writes each bucket with one batched one-sided write per engine (`batch_transfer_sync_write`), engines in
   parallel.
3. The ranks exchange success or their error (allgather), so a failure anywhere fails every rank with the same
   message. Rank 0 then commits on every engine (`POST /p2p/commit {weight_version}`: the engine loads the
   buffer through its normal load path) and broadcasts the outcome — the other ranks wait for it, so no rank
   writes the next sync into a buffer that is still being loaded — and, with `verify`, compares every
   engine's sha256 per tensor.

An engine that dies (Mooncake's -1, a failed commit): rank 0 probes every engine's /health (`mark_dead`) and
broadcasts the dead ones; every rank drops their pieces and the sync is written and committed again on the
others, and the push reports them (`"dead"`) for the runtime to restart. A failure with every engine alive is
raised on every rank.

Failure: Mooncake returns -1 at once for a dead peer (connection refused / reset); a stuck peer (e.g. a stopped
process) blocks inside Mooncake, so each bucket's writes run in daemon threads joined against a deadline
(`timeout_s` per push) and the push raises `TimeoutError` naming the engine. After a timeout the staging buffer
may still be read by Mooncake, so the transport refuses further pushes (`RuntimeError`): restart the run.
Seen: if a peer that was stuck then dies, Mooncake 0.3.13 aborts the writing process ("terminate called") —
the timeout turns a hang into an error, not that abort into one.

SGLang engines (0.5.23): its HTTP API has no endpoint that registers a receive buffer with a TransferEngine
and loads from it (we could not run SGLang here to check any other route), so `prepare` sees a non-embedded
engine (`/server_info` "engine" is not "glm_rl.embedded"), warns, and falls back to the broadcast transport on
rank 0 (the other ranks then send nothing). A future SGLang path would mirror `p2p_receiver.py` inside its
model runner: register the (TP-sharded) receive buffer per TP rank and commit through
`update_weights_from_tensor`'s loader.

On clusters: install the CUDA Mooncake package and pass `protocol="rdma"`; buffers are then GPU memory and the
sources' staging buffers too (the plan and the protocol stay the same).
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from glm_rl.models.glm45.hf_names import split_dim
from glm_rl.ray.addresses import node_ip
from glm_rl.weights.mooncake import new_transfer_engine
from glm_rl.weights.transfer_plan import (
    EngineLayout,
    Plan,
    TensorMeta,
    Transfer,
    build_plan,
    local_slices,
    replicated_sources,
)
from glm_rl.weights.transports import BaseTransport, BroadcastTransport, Named
from glm_rl.weights.wire import parse_dtype

log = logging.getLogger(__name__)


class Coordinator:
    """Small collectives over a gloo/NCCL ProcessGroup object (the trainer's, or one built for tests);
    `pg=None` means a single rank."""

    def __init__(self, pg: Any, rank: int, world_size: int) -> None:
        self.pg, self.rank, self.world_size = pg, rank, world_size

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world_size == 1:
            return obj
        data = pickle.dumps(obj) if self.rank == 0 else b""
        size = torch.tensor([len(data)], dtype=torch.int64)
        self._bcast(size)
        buf = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if self.rank == 0
            else torch.empty(int(size), dtype=torch.uint8)
        )
        self._bcast(buf)
        return obj if self.rank == 0 else pickle.loads(buf.numpy().tobytes())

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        data = pickle.dumps(obj)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        self.pg.allgather([sizes], [torch.tensor([len(data)], dtype=torch.int64)]).wait()
        n = int(max(sizes))
        mine = torch.zeros(n, dtype=torch.uint8)
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        outs = [torch.zeros(n, dtype=torch.uint8) for _ in range(self.world_size)]
        self.pg.allgather([outs], [mine]).wait()
        return [pickle.loads(o[: int(s)].numpy().tobytes()) for o, s in zip(outs, sizes)]

    def _bcast(self, t: torch.Tensor) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        self.pg.broadcast([t], opts).wait()


class P2PTransport(BaseTransport):
    """The `p2p` WeightTransport of one trainer rank (see the module docstring)."""

    def __init__(
        self,
        engine_urls: list[str],
        api_key: str | None,
        bucket_bytes: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        pg: Any = None,
        timeout_s: float = 120.0,
        protocol: str = "tcp",
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(engine_urls, api_key, bucket_bytes)
        for c in self.clients:
            c.timeout = timeout_s
        self.urls = list(engine_urls)
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.protocol, self.host = protocol, host
        self.coord = Coordinator(pg, rank, world_size)
        self.fallback_mode = False  # SGLang engines: rank 0 broadcasts, the others idle
        self.fallback: BroadcastTransport | None = None
        self.plan: Plan | None = None
        self._plan_key: tuple | None = None
        self._endpoints: list[tuple[str, int]] = []
        self._te = None
        self._staging: torch.Tensor | None = None
        self._broken: str | None = None

    @classmethod
    def for_this_rank(cls, engine_urls: list[str], api_key: str | None, bucket_bytes: int, **kw: Any):
        """Rank, world size and group from the initialized default torch.distributed group (else one rank)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            kw.setdefault("rank", dist.get_rank())
            kw.setdefault("world_size", dist.get_world_size())
            kw.setdefault("pg", dist.group.WORLD)
        kw.setdefault("host", node_ip())  # Mooncake's local hostname: engines on other nodes reach it
        return cls(engine_urls, api_key, bucket_bytes, **kw)

    # -- setup -------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Read the engines' layouts (rank 0, shared with all ranks); fall back to broadcast for SGLang."""
        info = _guard(lambda: self._each(lambda c: c.server_info())) if self.rank == 0 else None
        info = _unwrap(self.coord.broadcast(info))
        self.engines = [EngineLayout(i, int(s.get("tp_size", 1)), split_dim) for i, s in enumerate(info)]
        dtypes = {s.get("dtype") for s in info}
        if len(dtypes) != 1:
            raise RuntimeError(f"p2p: engines run different dtypes {sorted(map(str, dtypes))}")
        self.engine_dtype = parse_dtype(dtypes.pop())
        foreign = [u for u, s in zip(self.urls, info) if s.get("engine") != "glm_rl.embedded"]
        if foreign:
            log.warning("p2p weight sync: engines %s take no P2P weights (SGLang); falling back to broadcast", foreign)
            self.fallback_mode = True
            if self.rank == 0:
                self.fallback = BroadcastTransport(self.urls, self.clients[0].api_key, self.bucket_bytes)
                self.fallback.prepare()

    def _transfer_engine(self):
        if self._te is None:
            self._te = new_transfer_engine(self.host, self.protocol)
        return self._te

    def _ensure_plan(self, named: Named) -> None:
        """Build the plan (same on every rank) and, on a new one, prepare every engine's receive buffer."""
        metas = [TensorMeta(n, tuple(t.shape), str(self.engine_dtype).removeprefix("torch.")) for n, t in named]
        key = tuple((m.name, m.shape) for m in metas)
        if key == self._plan_key:
            return
        plan = build_plan(
            metas, replicated_sources(metas, range(self.world_size)), self.engines, chunk_bytes=self.bucket_bytes
        )
        endpoints = _guard(lambda: self._prepare_engines(plan)) if self.rank == 0 else None
        self._endpoints = _unwrap(self.coord.broadcast(endpoints))
        mine = plan.for_source(self.rank)
        size = max([self.bucket_bytes] + [t.nbytes for t in mine])
        te = self._transfer_engine()
        if self._staging is None or self._staging.numel() < size:
            if self._staging is not None:
                te.unregister_memory(self._staging.data_ptr())
            self._staging = torch.empty(size, dtype=torch.uint8)
            if te.register_memory(self._staging.data_ptr(), size) != 0:
                raise RuntimeError(f"p2p: Mooncake register_memory of {size} staging bytes failed")
        self.plan, self._plan_key = plan, key

    def _prepare_engines(self, plan: Plan) -> list[tuple[str, int]]:
        def one(i: int) -> tuple[str, int] | None:
            if i in self.dead:
                return None
            if self.engines[i].tp_size != 1:
                raise RuntimeError(
                    f"p2p: engine {self.urls[i]} has tp_size {self.engines[i].tp_size}; "
                    f"the embedded engine receives on one rank"
                )
            pieces = [
                {
                    "name": t.name,
                    "dtype": plan.tensors[t.name].dtype,
                    "shape": list(plan.tensors[t.name].shape),
                    "box": [list(r) for r in t.box],
                    "offset": t.dst_offset,
                    "nbytes": t.nbytes,
                }
                for t in plan.for_engine(i, 0)
            ]
            ans = self.clients[i].post(
                "/p2p/prepare",
                {"tensors": pieces, "protocol": self.protocol, "buffer_bytes": plan.buffer_bytes[(i, 0)]},
            )
            return ans["session_id"], int(ans["buffer_ptr"])

        return [f.result() for f in [self.pool.submit(one, i) for i in range(len(self.clients))]]

    # -- one sync ----------------------------------------------------------------------------------------
    def push(self, named: Named, version: int, verify: bool, defer_verify: bool = False) -> dict:
        """Every rank writes its share; rank 0 commits and verifies (so there is no later verification)."""
        if defer_verify:
            raise ValueError("p2p verifies at its commit, on rank 0: defer_verify does not apply")
        named = list(named)  # the plan covers the whole model
        if self.fallback_mode:
            return self.fallback.push(named, version, verify) if self.fallback else {"verified": False}
        if self._broken:
            raise RuntimeError(f"p2p transport unusable after an earlier failure: {self._broken}")
        t0 = time.time()
        self._ensure_plan(named)
        for _ in range(len(self.clients) + 1):
            failure, stuck = self._write_and_commit(dict(named), version, t0)
            if failure is None:
                break
            dead = [] if stuck else self.coord.broadcast(self._dead_after(failure) if self.rank == 0 else None)
            if not dead:  # no death, or a write that timed out (its staging buffer may still be read): raise
                raise RuntimeError(f"p2p weight sync v{version} failed: {failure}")
            self.dead.update(dead)  # every rank: their pieces are skipped, the others written again
        else:
            raise RuntimeError(f"p2p weight sync v{version}: engines kept dying")
        sent = self._sent
        if self.rank != 0:
            return {"verified": False, "bytes": sent, "tensors": 0, "seconds": time.time() - t0}
        if verify:  # what the engines now hold: the whole model, in their dtype
            named = [(n, t.detach().to(self.engine_dtype)) for n, t in named]
        result = self._finish(self._tally(named, verify), version, verify, t0)
        return {**result, "bytes_sent_by_rank0": sent}

    def _write_and_commit(self, tensors: dict[str, torch.Tensor], version: int, t0: float) -> tuple[str | None, bool]:
        """Write every rank's pieces, then (rank 0) commit on every live engine. (None, False), or what failed
        and whether a write timed out: the same on every rank."""
        sent = _guard(lambda: self._write(tensors, t0 + self.timeout_s))
        errors = [(r, e) for r, e in enumerate(self.coord.all_gather(sent)) if isinstance(e, _Failed)]
        if errors:
            return "; ".join(f"source rank {r}: {e.message}" for r, e in errors), any(e.timed_out for _, e in errors)
        self._sent = sent
        # nobody writes the next sync into the buffers before every engine has loaded this one
        committed = (
            _guard(lambda: self._each(lambda c: c.post("/p2p/commit", {"weight_version": version})))
            if self.rank == 0
            else None
        )
        committed = self.coord.broadcast(committed)
        return (f"commit failed: {committed.message}" if isinstance(committed, _Failed) else None), False

    def _dead_after(self, failure: str) -> list[int]:
        """Rank 0: the engines found dead after `failure` (none: it was no death)."""
        try:
            return self.mark_dead(RuntimeError(failure))
        except RuntimeError:
            return []

    def _write(self, tensors: dict[str, torch.Tensor], deadline: float) -> int:
        """Pack and write this rank's pieces for the live engines, bucket by bucket; returns the bytes sent."""
        mine = [t for t in self.plan.for_source(self.rank) if t.engine not in self.dead]
        buckets: list[list[Transfer]] = [[]]
        used = 0
        for t in mine:
            if buckets[-1] and used + t.nbytes > self._staging.numel():
                buckets.append([])
                used = 0
            buckets[-1].append(t)
            used += t.nbytes
        for bucket in buckets:
            self._write_bucket(bucket, tensors, deadline)
        return sum(t.nbytes for t in mine)

    def _write_bucket(self, bucket: list[Transfer], tensors: dict[str, torch.Tensor], deadline: float) -> None:
        per_engine: dict[int, tuple[list[int], list[int], list[int]]] = {}
        off, base = 0, self._staging.data_ptr()
        for t in bucket:
            src = tensors[t.name].detach()[local_slices(t.box, self.plan.tensors[t.name].full_box)]
            dst = self._staging[off : off + t.nbytes].view(self.engine_dtype).view(src.shape)
            dst.copy_(src)
            srcs, dsts, lens = per_engine.setdefault(t.engine, ([], [], []))
            srcs.append(base + off)
            dsts.append(self._endpoints[t.engine][1] + t.dst_offset)
            lens.append(t.nbytes)
            off += t.nbytes
        results: dict[int, int] = {}
        threads = []
        for eng, (srcs, dsts, lens) in per_engine.items():
            session = self._endpoints[eng][0]
            fn = lambda e=eng, s=session, a=srcs, b=dsts, n=lens: results.__setitem__(  # noqa: E731
                e, self._te.batch_transfer_sync_write(s, a, b, n)
            )
            threads.append((eng, threading.Thread(target=fn, daemon=True, name=f"p2p-write-{eng}")))
            threads[-1][1].start()
        for eng, th in threads:
            th.join(timeout=max(0.0, deadline - time.time()))
            if th.is_alive():
                self._broken = f"write to engine {self.urls[eng]} timed out"
                raise TimeoutError(
                    f"p2p write to engine {self.urls[eng]} (Mooncake session "
                    f"{self._endpoints[eng][0]}) did not finish within {self.timeout_s:.0f}s"
                )
            if results.get(eng) != 0:
                raise RuntimeError(
                    f"p2p write to engine {self.urls[eng]} (Mooncake session "
                    f"{self._endpoints[eng][0]}) failed: rc {results.get(eng)} (dead peer or bad "
                    f"address)"
                )

    def close(self) -> None:
        try:
            if self.fallback is not None:
                self.fallback.close()
            elif self.rank == 0 and self.plan is not None and not self._broken:
                self._each(lambda c: c.post("/p2p/close"))
        except Exception as e:  # noqa: BLE001 - closing must not mask the run's own error
            log.warning("p2p close: %s", e)
        finally:
            if self._te is not None and self._staging is not None and not self._broken:
                self._te.unregister_memory(self._staging.data_ptr())
            super().close()


@dataclass(frozen=True)
class _Failed:
    message: str
    timed_out: bool = False


def _guard(fn):
    """fn()'s result, or its error as `_Failed` (picklable: it travels to the other ranks instead of hanging
    them in the next collective)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - re-raised by _unwrap / push on every rank
        log.exception("p2p weight sync step failed")
        return _Failed(f"{type(e).__name__}: {e}", isinstance(e, TimeoutError))


def _unwrap(value):
    if isinstance(value, _Failed):
        raise RuntimeError(f"p2p setup failed on rank 0: {value.message}")
    return value
