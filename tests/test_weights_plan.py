"""Transfer plans against hand-computed layouts: replicas → engines, TP resharding, uncovered bytes, pricing."""

from __future__ import annotations

import itertools

import pytest

from glm_rl.models.glm45.hf_names import split_dim
from glm_rl.weights.transfer_plan import (
    EngineLayout,
    PlanError,
    SourceShard,
    TensorMeta,
    box_numel,
    build_plan,
    floor_seconds,
    megatron_sources,
    predict_sync_seconds,
    replicated_sources,
)

# float32 bytes: 64, 96, 32, 128, 64 (total 384)
TENSORS = [
    TensorMeta("a", (4, 4), "float32"),
    TensorMeta("b", (6, 4), "float32"),
    TensorMeta("c", (8,), "float32"),
    TensorMeta("d", (8, 4), "float32"),
    TensorMeta("e", (2, 8), "float32"),
]


def _covers_exactly_once(transfers, meta, box):
    """Every element of `box` of `meta` is delivered exactly once by `transfers` (all for that tensor)."""
    counts = {}
    for t in transfers:
        for idx in itertools.product(*[range(a, b) for a, b in t.box]):
            counts[idx] = counts.get(idx, 0) + 1
    want = set(itertools.product(*[range(a, b) for a, b in box]))
    assert set(counts) == want, meta.name
    assert set(counts.values()) == {1}, meta.name


def test_two_replicas_to_two_engines_each_byte_once_and_balanced():
    plan = build_plan(TENSORS, replicated_sources(TENSORS, [0, 1]), [EngineLayout(0), EngineLayout(1)])
    assert len(plan.transfers) == 10  # one whole tensor per (engine, tensor): nothing to cut
    for eng in (0, 1):
        got = plan.for_engine(eng)
        assert sorted(t.name for t in got) == sorted(m.name for m in TENSORS)
        for t in got:
            assert t.box == plan.tensors[t.name].full_box and t.nbytes == box_numel(t.box) * 4
        # packed back to back, 64-byte aligned, no overlap; buffer size = sum of aligned sizes
        ends = [(t.dst_offset, t.dst_offset + t.nbytes) for t in sorted(got, key=lambda t: t.dst_offset)]
        assert all(a % 64 == 0 for a, _ in ends) and all(b0 <= a1 for (_, b0), (a1, _) in zip(ends, ends[1:]))
        assert plan.buffer_bytes[(eng, 0)] == 64 + 128 + 64 + 128 + 64
    loads = plan.bytes_per_source()
    assert set(loads) == {0, 1} and min(loads.values()) > 0  # every source used
    assert sum(loads.values()) == 2 * 384
    assert abs(loads[0] - loads[1]) <= 128  # ±1 tensor (largest is 128 B)
    assert loads == {0: 384, 1: 384}  # LPT: 128,128→0,1; 96,96→1,0; 64×4; 32,32


def test_chunking_balances_a_single_big_tensor_over_replicas():
    big = [TensorMeta("w", (1024, 16), "bfloat16")]  # 32 KiB
    plan = build_plan(big, replicated_sources(big, range(4)), [EngineLayout(0)], chunk_bytes=4096)
    assert plan.bytes_per_source() == {r: 8192 for r in range(4)}
    _covers_exactly_once(plan.transfers, big[0], big[0].full_box)


def test_engine_tp2_resharding_covers_each_slice_exactly():
    tensors = [
        TensorMeta("model.layers.0.self_attn.q_proj.weight", (8, 4), "float32"),
        TensorMeta("model.layers.0.self_attn.o_proj.weight", (4, 8), "float32"),
        TensorMeta("model.layers.0.input_layernorm.weight", (4,), "float32"),
    ]
    # trainer TP2 along the same dims + a TP4 source for o_proj: cuts must line up across layouts
    sources = [
        SourceShard(0, tensors[0].name, ((0, 4), (0, 4))),
        SourceShard(1, tensors[0].name, ((4, 8), (0, 4))),
        SourceShard(0, tensors[1].name, ((0, 4), (0, 2))),
        SourceShard(1, tensors[1].name, ((0, 4), (2, 8))),
        SourceShard(0, tensors[2].name),
        SourceShard(1, tensors[2].name),
    ]
    plan = build_plan(tensors, sources, [EngineLayout(0, tp_size=2, split=split_dim)])
    q, o, norm = tensors
    for r in (0, 1):
        got = plan.for_engine(0, r)
        want_q = ((4 * r, 4 * r + 4), (0, 4))
        want_o = ((0, 4), (4 * r, 4 * r + 4))
        _covers_exactly_once([t for t in got if t.name == q.name], q, want_q)
        _covers_exactly_once([t for t in got if t.name == o.name], o, want_o)
        _covers_exactly_once([t for t in got if t.name == norm.name], norm, norm.full_box)
        ends = sorted((t.dst_offset, t.dst_offset + t.nbytes) for t in got)
        assert all(b0 <= a1 for (_, b0), (a1, _) in zip(ends, ends[1:]))
    # q rows 0-3 live only on rank 0: engine rank 0's q comes from source 0 alone
    assert {t.source for t in plan.for_engine(0, 0) if t.name == q.name} == {0}
    # o: engine rank 0 needs cols 0-3 = source 0's cols 0-1 + source 1's cols 2-3
    pieces = sorted((t.source, t.box) for t in plan.for_engine(0, 0) if t.name == o.name)
    assert pieces == [(0, ((0, 4), (0, 2))), (1, ((0, 4), (2, 4)))]


def test_uncovered_tensor_is_named():
    tensors = [TensorMeta("model.layers.3.mlp.experts.down_proj", (4, 2, 2), "bfloat16")]
    sources = [SourceShard(0, tensors[0].name, ((0, 2), (0, 2), (0, 2)))]  # experts 2-3 held by nobody
    with pytest.raises(PlanError, match=r"model\.layers\.3\.mlp\.experts\.down_proj.*\(2, 4\)"):
        build_plan(tensors, sources, [EngineLayout(0)])
    with pytest.raises(PlanError, match="does not split into 3"):
        build_plan(tensors, replicated_sources(tensors, [0]), [EngineLayout(0, tp_size=3, split=split_dim)])


def test_megatron_model_layout_and_pricing():
    # 2 layers, PP2, EP2, 4 ranks: experts split in halves per stage, no expert-DP; dense repeated over 2 ranks
    tensors = [
        TensorMeta("model.embed_tokens.weight", (8, 4), "bfloat16"),
        TensorMeta("model.layers.0.mlp.experts.down_proj", (4, 4, 2), "bfloat16"),
        TensorMeta("model.layers.1.mlp.experts.down_proj", (4, 4, 2), "bfloat16"),
        TensorMeta("lm_head.weight", (8, 4), "bfloat16"),
    ]
    src = megatron_sources(tensors, world=4, tp=1, pp=2, ep=2, num_layers=2, split=split_dim)
    held = {(s.rank, s.name): s.box for s in src}
    assert held[(1, tensors[1].name)] == ((2, 4), (0, 4), (0, 2)) and (2, tensors[1].name) not in held
    assert held[(3, tensors[2].name)] == ((2, 4), (0, 4), (0, 2)) and (3, "lm_head.weight") in held
    plan = build_plan(tensors, src, [EngineLayout(0, tp_size=2, split=split_dim)])
    assert set(plan.bytes_per_source().values()) == {64}  # 256 B over 4 sources, each rank sends its part
    assert predict_sync_seconds(plan, source_bandwidth=32.0) == pytest.approx(128 / 32)  # 2 dest links busiest
    assert floor_seconds(plan.total_bytes, 2, 32.0) == pytest.approx(4.0)
