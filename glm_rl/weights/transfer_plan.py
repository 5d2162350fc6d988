"""Transfer plans: which source rank writes which bytes of which tensor to which engine rank, and where they land.

Pure code (no torch, no I/O): the P2P transport (`weights/p2p.py`) runs a plan, `glm-rl plan` and
`benchmarks/weight_sync.py` price one against link bandwidths.

Layout format (everything in HF names and HF shapes, i.e. after the trainer's minimal gather / name bridge):
- `TensorMeta(name, shape, dtype)`: one tensor as the engine loads it; `dtype` is the dtype on the wire (the
  engine's), e.g. "bfloat16".
- A box is a tuple of `(start, stop)` per dim, in the FULL tensor's coordinates. `None` means the whole tensor.
- Sources: `SourceShard(rank, name, box)` says "trainer rank `rank` holds `tensor[box]`". The torch (data
  parallel) backend: every rank holds every tensor whole (`replicated_sources`). Megatron: a TP shard is a box
  split along the TP dim, an EP shard a box along the expert dim (dim 0 of HF's fused `experts.*` tensors), a
  PP stage holds only its layers, and DP replicas repeat the same box on other ranks (`megatron_sources` is a
  simple model of that layout; the real one comes from the Megatron backend's export metadata).
- Engines: `EngineLayout(engine, tp_size, split)`: engine rank r of `tp_size` needs, for every tensor, the
  r-th of `tp_size` equal slices along `split(name, shape)` (column-parallel q/k/v/gate/up: dim 0, row-parallel
  o/down: dim 1, experts: dim 0 = EP, vocab-parallel embed / lm_head: dim 0), or the whole tensor when `split`
  returns None (norms, router); `glm_rl.models.glm45.hf_names.split_dim` is that table for GLM-4.5.

Algorithm: every (engine rank, needed box) is cut along every source box boundary inside it, so each piece is
held whole by at least one source (none: `PlanError` naming the tensor and the uncovered box); pieces larger
than `chunk_bytes` are cut along their first splittable dim (finer load balance, bounded staging buffers). Then
the longest-first greedy rule gives each piece to the least-loaded source holding it, so every replica sends a
share and the per-source bytes differ by at most one piece. Each engine rank's pieces are packed back to back
(aligned to `align` bytes) into one receive buffer: `Transfer.dst_offset`. A source packs `tensor[box]`
(row-major, contiguous) and writes it there; the engine copies pieces into its weights on commit.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

Box = tuple[tuple[int, int], ...]
SplitFn = Callable[[str, tuple[int, ...]], "int | None"]

ITEMSIZE = {
    "float64": 8,
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


class PlanError(ValueError):
    """A layout the plan cannot serve (uncovered bytes, indivisible TP split, unknown tensor or dtype)."""


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def itemsize(self) -> int:
        key = str(self.dtype).removeprefix("torch.")
        if key not in ITEMSIZE:
            raise PlanError(f"tensor {self.name!r}: unknown dtype {self.dtype!r}")
        return ITEMSIZE[key]

    @property
    def full_box(self) -> Box:
        return tuple((0, d) for d in self.shape)


@dataclass(frozen=True)
class SourceShard:
    rank: int
    name: str
    box: Box | None = None  # None: the whole tensor


@dataclass(frozen=True)
class EngineLayout:
    engine: int
    tp_size: int = 1
    split: SplitFn | None = None  # None: every tensor replicated on every engine rank


@dataclass(frozen=True)
class Transfer:
    source: int
    engine: int
    engine_rank: int
    name: str
    box: Box  # in full-tensor coordinates
    nbytes: int
    dst_offset: int  # into the (engine, engine_rank) receive buffer


@dataclass(frozen=True)
class Plan:
    tensors: dict[str, TensorMeta]
    transfers: tuple[Transfer, ...]
    buffer_bytes: dict[tuple[int, int], int]  # (engine, engine_rank) -> receive buffer size
    sources: tuple[int, ...]  # every source rank of the layout, used or not

    def for_source(self, rank: int) -> list[Transfer]:
        return [t for t in self.transfers if t.source == rank]

    def for_engine(self, engine: int, engine_rank: int = 0) -> list[Transfer]:
        return [t for t in self.transfers if t.engine == engine and t.engine_rank == engine_rank]

    def bytes_per_source(self) -> dict[int, int]:
        out = dict.fromkeys(self.sources, 0)
        for t in self.transfers:
            out[t.source] += t.nbytes
        return out

    def bytes_per_destination(self) -> dict[tuple[int, int], int]:
        out = dict.fromkeys(self.buffer_bytes, 0)
        for t in self.transfers:
            out[(t.engine, t.engine_rank)] += t.nbytes
        return out

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.transfers)


# -- geometry ---------------------------------------------------------------------------------------------
def box_numel(box: Box) -> int:
    return math.prod(b - a for a, b in box)


def box_contains(outer: Box, inner: Box) -> bool:
    return all(oa <= ia and ib <= ob for (oa, ob), (ia, ib) in zip(outer, inner))


def _intersect(a: Box, b: Box) -> Box | None:
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return out if all(lo < hi for lo, hi in out) else None


def local_slices(box: Box, origin: Box) -> tuple[slice, ...]:
    """Slices that pick `box` out of a tensor that holds `origin` (both in full-tensor coordinates)."""
    return tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(box, origin))


def split_box(meta: TensorMeta, dim: int | None, index: int, count: int) -> Box:
    """The `index`-th of `count` equal slices of the tensor along `dim` (the whole tensor if dim is None)."""
    box = meta.full_box
    if dim is None or count == 1:
        return box
    size = meta.shape[dim]
    if size % count:
        raise PlanError(f"tensor {meta.name!r}: dim {dim} of size {size} does not split into {count} equal parts")
    step = size // count
    return box[:dim] + ((index * step, (index + 1) * step),) + box[dim + 1 :]


def _cells(need: Box, holders: list[Box]) -> Iterable[Box]:
    """Cut `need` along every holder boundary inside it: each cell is inside or outside each holder."""
    cuts = []
    for d, (lo, hi) in enumerate(need):
        points = {lo, hi} | {p for h in holders for p in h[d] if lo < p < hi}
        cuts.append(sorted(points))
    for ranges in itertools.product(*[list(zip(c, c[1:])) for c in cuts]):
        yield tuple(ranges)


def _chunks(box: Box, itemsize: int, chunk_bytes: int | None) -> list[Box]:
    """Cut `box` along its first dim of size > 1 into pieces of at most ~chunk_bytes."""
    nbytes = box_numel(box) * itemsize
    if not chunk_bytes or nbytes <= chunk_bytes:
        return [box]
    for d, (lo, hi) in enumerate(box):
        if hi - lo > 1:
            per_row = nbytes // (hi - lo)
            rows = max(1, chunk_bytes // max(per_row, 1))
            return [box[:d] + ((a, min(a + rows, hi)),) + box[d + 1 :] for a in range(lo, hi, rows)]
    return [box]


# -- the plan ---------------------------------------------------------------------------------------------
def build_plan(
    tensors: Sequence[TensorMeta],
    sources: Sequence[SourceShard],
    engines: Sequence[EngineLayout],
    *,
    chunk_bytes: int | None = None,
    align: int = 64,
) -> Plan:
    """Transfers that deliver every engine rank's share of every tensor exactly once (see module docstring)."""
    metas = {m.name: m for m in tensors}
    held: dict[str, list[tuple[int, Box]]] = defaultdict(list)
    for s in sources:
        if s.name not in metas:
            raise PlanError(f"source rank {s.rank} holds {s.name!r}, which is not among the tensors to send")
        box = metas[s.name].full_box if s.box is None else tuple(tuple(r) for r in s.box)
        if not box_contains(metas[s.name].full_box, box):
            raise PlanError(f"source rank {s.rank}: box {box} lies outside tensor {s.name!r} {metas[s.name].shape}")
        held[s.name].append((s.rank, box))

    pieces = []  # (nbytes, engine, engine_rank, name, box, candidate ranks)
    for e in engines:
        for r in range(e.tp_size):
            for meta in tensors:
                dim = e.split(meta.name, meta.shape) if e.split else None
                need = split_box(meta, dim, r, e.tp_size)
                holders = [b for _, b in held[meta.name] if _intersect(b, need)]
                for cell in _cells(need, holders):
                    cands = sorted({rank for rank, b in held[meta.name] if box_contains(b, cell)})
                    if not cands:
                        raise PlanError(
                            f"tensor {meta.name!r}: no source rank holds {cell} (needed by engine {e.engine} rank {r})"
                        )
                    for piece in _chunks(cell, meta.itemsize, chunk_bytes):
                        pieces.append((box_numel(piece) * meta.itemsize, e.engine, r, meta.name, piece, cands))

    load = {rank: 0 for rank in sorted({s.rank for s in sources})}
    assigned = []
    for nbytes, eng, r, name, box, cands in sorted(pieces, key=lambda p: (-p[0], p[1], p[2], p[3], p[4])):
        src = min(cands, key=lambda c: (load[c], c))
        load[src] += nbytes
        assigned.append((eng, r, name, box, nbytes, src))

    offsets: dict[tuple[int, int], int] = {(e.engine, r): 0 for e in engines for r in range(e.tp_size)}
    order = {m.name: i for i, m in enumerate(tensors)}
    transfers = []
    for eng, r, name, box, nbytes, src in sorted(assigned, key=lambda a: (a[0], a[1], order[a[2]], a[3])):
        off = offsets[(eng, r)]
        transfers.append(Transfer(src, eng, r, name, box, nbytes, off))
        offsets[(eng, r)] = off + -(-nbytes // align) * align
    return Plan(metas, tuple(transfers), offsets, tuple(load))


# -- layouts ----------------------------------------------------------------------------------------------
def replicated_sources(tensors: Sequence[TensorMeta], ranks: Iterable[int]) -> list[SourceShard]:
    """Data parallel: every rank holds every tensor whole."""
    return [SourceShard(r, m.name) for r in ranks for m in tensors]


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() else None


def megatron_sources(
    tensors: Sequence[TensorMeta], *, world: int, tp: int, pp: int, ep: int, num_layers: int, split: SplitFn
) -> list[SourceShard]:
    """A simple model of Megatron's layout: rank = stage * (world // pp) + i; layers are cut into `pp` equal
    stages (embeddings on the first, final norm + LM head on the last); inside a stage, expert tensors are
    split over `ep` ranks along dim 0 (i % ep) and repeated over world // pp // ep expert-DP replicas, other
    tensors are split over `tp` ranks along their TP dim (i % tp) and repeated over the DP replicas. It
    ignores Megatron's fused QKV / gate-up storage (bytes, not order, matter for pricing)."""
    per_stage = world // pp
    if world % pp or per_stage % tp or per_stage % ep:
        raise PlanError(f"world {world} does not factor into pp {pp} x (multiples of tp {tp} and ep {ep})")
    out = []
    for m in tensors:
        layer = layer_of(m.name)
        stage = (0 if "embed_tokens" in m.name else pp - 1) if layer is None else min(pp - 1, layer * pp // num_layers)
        expert = ".mlp.experts." in m.name
        dim = split(m.name, m.shape)
        for i in range(per_stage):
            box = split_box(m, dim, i % ep, ep) if expert else split_box(m, dim, i % tp, tp)
            out.append(SourceShard(stage * per_stage + i, m.name, box))
    return out


# -- pricing ----------------------------------------------------------------------------------------------
def predict_sync_seconds(plan: Plan, source_bandwidth: float, dest_bandwidth: float | None = None) -> float:
    """Bytes over the busiest link: max(bytes sent by any source rank / its NIC bandwidth, bytes received by
    any engine rank / its NIC bandwidth), in bytes/s. One NIC per rank (a GPU and its RDMA NIC); assumes the
    fabric is non-blocking, so links are the sources' and destinations' NICs."""
    dest_bandwidth = dest_bandwidth or source_bandwidth
    send = max(plan.bytes_per_source().values(), default=0) / source_bandwidth
    recv = max(plan.bytes_per_destination().values(), default=0) / dest_bandwidth
    return max(send, recv)


def floor_seconds(total_bytes: int, n_links: int, bandwidth: float) -> float:
    """The physical floor: `total_bytes` spread perfectly over `n_links` links of `bandwidth` bytes/s."""
    return total_bytes / (n_links * bandwidth)
