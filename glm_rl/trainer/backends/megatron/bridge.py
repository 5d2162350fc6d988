"""HF ↔ Megatron names and shapes for GLM-4.5: ONE table, used for import and for export (weight sync).

Why our own bridge rather than mbridge 0.15.1: mbridge reached parity here, but only through a subclass over its
private methods (it hard-codes TE specs, lacks the local-spec names, references a removed `ModelType`, forces SP,
and would load layer 0 into the MTP layer silently under megatron-core 0.19's names; FACTS.md). The GLM-4.5 map
is small enough to own, test bitwise, and keep in step with our pinned megatron-core.

The HF side uses `Glm4MoeForCausalLM.state_dict()` names — what weight sync sends — where routed experts are
fused: `mlp.experts.gate_up_proj` (E, 2I, H) with gate rows first, `mlp.experts.down_proj` (E, H, I).

Each `Entry` says: Megatron (local) name ← HF tensors, and a `kind` that fixes both the merge of the HF tensors
into one full Megatron tensor and how that tensor is split over tensor-parallel ranks:
- `rep`     replicated (norms, router weight, expert bias)
- `col`     split dim 0 (MTP `eh_proj`)
- `vocab`   split dim 0 like `col`, rows padded with zeros to Megatron's padded vocab on import, stripped on
            export (embedding, LM head)
- `row`     split dim 1 (attention output, fc2)
- `qkv`     q/k/v interleaved per query group: rows [q(g) (heads/groups × d), k(g) (d), v(g) (d)] for each
            group g; groups are contiguous, so TP splits dim 0
- `gate_up` [gate; up] stacked on dim 0; TP rank r holds [gate_r; up_r]
An `HFRef` with `expert` set addresses one slice `tensor[expert]` of a fused expert tensor.
Expert parallel: local expert i on EP rank r is global expert r × (E / EP) + i.
Pipeline parallel: a stage holds decoder layers [offset, offset + n) under local names `decoder.layers.{j}`
(HF `model.layers.{offset + j}`), the embedding on the first stage, final norm + LM head on the last, and the
MTP layer (`mtp.layers.0.*` ← HF `model.layers.{num_hidden_layers}.*`; megatron-core 0.19 names its body
`mtp_model_layer`) on the last stage, which then also holds its own copy of the embedding. Import fills the
stage's tensors; export gathers every stage over the PP group, so every rank yields the whole model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from glm_rl.models.glm45.presets import ModelSpec


@dataclass(frozen=True)
class HFRef:
    name: str
    expert: int | None = None  # index into a fused (E, ...) expert tensor


@dataclass(frozen=True)
class Entry:
    mcore: str
    hf: tuple[HFRef, ...]
    kind: str  # rep | col | row | qkv | gate_up


def _e(mcore: str, kind: str, *hf: str | HFRef) -> Entry:
    return Entry(mcore, tuple(h if isinstance(h, HFRef) else HFRef(h) for h in hf), kind)


def _layer_entries(spec: ModelSpec, m: str, h: str, moe: bool, ep_rank: int, ep_size: int) -> list[Entry]:
    """One transformer layer: Megatron prefix `m` ← HF prefix `h` (dense MLP unless `moe`)."""
    attn = "self_attn."
    out = [
        _e(m + "input_layernorm.weight", "rep", h + "input_layernorm.weight"),
        _e(m + "self_attention.linear_qkv.weight", "qkv", *(h + attn + f"{p}_proj.weight" for p in "qkv")),
        _e(m + "self_attention.linear_proj.weight", "row", h + attn + "o_proj.weight"),
        _e(m + "pre_mlp_layernorm.weight", "rep", h + "post_attention_layernorm.weight"),
    ]
    if spec.attention_bias:
        out.append(_e(m + "self_attention.linear_qkv.bias", "qkv", *(h + attn + f"{p}_proj.bias" for p in "qkv")))
    if spec.use_qk_norm:
        out += [
            _e(m + "self_attention.q_layernorm.weight", "rep", h + attn + "q_norm.weight"),
            _e(m + "self_attention.k_layernorm.weight", "rep", h + attn + "k_norm.weight"),
        ]
    if not moe:
        return out + [
            _e(m + "mlp.linear_fc1.weight", "gate_up", h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
            _e(m + "mlp.linear_fc2.weight", "row", h + "mlp.down_proj.weight"),
        ]
    out += [
        _e(m + "mlp.router.weight", "rep", h + "mlp.gate.weight"),
        _e(m + "mlp.router.expert_bias", "rep", h + "mlp.gate.e_score_correction_bias"),
    ]
    if spec.n_shared_experts:
        s = h + "mlp.shared_experts."
        out += [
            _e(m + "mlp.shared_experts.linear_fc1.weight", "gate_up", s + "gate_proj.weight", s + "up_proj.weight"),
            _e(m + "mlp.shared_experts.linear_fc2.weight", "row", s + "down_proj.weight"),
        ]
    n_local = spec.n_routed_experts // ep_size
    for local in range(n_local):
        g = ep_rank * n_local + local
        x = m + f"mlp.experts.local_experts.{local}."
        out += [
            _e(x + "linear_fc1.weight", "gate_up", HFRef(h + "mlp.experts.gate_up_proj", g)),  # fused already
            _e(x + "linear_fc2.weight", "row", HFRef(h + "mlp.experts.down_proj", g)),
        ]
    return out


def _mtp_entries(spec: ModelSpec, j: int, ep_rank: int, ep_size: int) -> list[Entry]:
    """MTP layer j: HF `model.layers.{num_hidden_layers + j}.*` (the checkpoint's names; `shared_head.norm` is
    HF's post-norm, Megatron's `final_layernorm`). The MTP embedding / head are the main model's."""
    m, h = f"mtp.layers.{j}.", f"model.layers.{spec.num_hidden_layers + j}."
    return [
        _e(m + "enorm.weight", "rep", h + "enorm.weight"),
        _e(m + "hnorm.weight", "rep", h + "hnorm.weight"),
        _e(m + "eh_proj.weight", "col", h + "eh_proj.weight"),
        _e(m + "final_layernorm.weight", "rep", h + "shared_head.norm.weight"),
        *_layer_entries(spec, m + "mtp_model_layer.", h, True, ep_rank, ep_size),
    ]


def weight_table(
    spec: ModelSpec,
    *,
    ep_rank: int = 0,
    ep_size: int = 1,
    layers: range | None = None,
    pre_process: bool = True,
    post_process: bool = True,
    mtp: bool = False,
) -> list[Entry]:
    """Every Megatron parameter/buffer one pipeline stage of this EP rank holds, with its HF sources.
    `layers`: the stage's global decoder layer numbers (default: all); `mtp`: the stage holds the MTP layers
    (and so, off the first stage, its own embedding copy). The defaults describe the un-pipelined model."""
    if spec.n_routed_experts % ep_size:
        raise ValueError(f"n_routed_experts={spec.n_routed_experts} is not divisible by expert parallel size {ep_size}")
    layers = range(spec.num_hidden_layers) if layers is None else layers
    embedding = _e("embedding.word_embeddings.weight", "vocab", "model.embed_tokens.weight")
    table = [embedding] if pre_process or mtp else []
    for j, i in enumerate(layers):
        table += _layer_entries(
            spec, f"decoder.layers.{j}.", f"model.layers.{i}.", i >= spec.first_k_dense_replace, ep_rank, ep_size
        )
    if post_process:
        table.append(_e("decoder.final_layernorm.weight", "rep", "model.norm.weight"))
        if not spec.tie_word_embeddings:
            table.append(_e("output_layer.weight", "vocab", "lm_head.weight"))
    if mtp:
        for j in range(spec.num_nextn_predict_layers):
            table += _mtp_entries(spec, j, ep_rank, ep_size)
    return table


# -- merge / split of one entry (full tensors) ------------------------------------------------------------
def _merge(spec: ModelSpec, kind: str, parts: list[torch.Tensor], vocab_rows: int) -> torch.Tensor:
    """HF tensors → one full (un-sharded) Megatron tensor (`vocab_rows`: Megatron's padded vocab)."""
    if kind == "vocab":
        (t,) = parts
        return torch.cat([t, t.new_zeros(vocab_rows - t.shape[0], *t.shape[1:])]) if vocab_rows > t.shape[0] else t
    if kind == "qkv":
        g, d = spec.num_key_value_heads, spec.head_dim
        q, k, v = (p.reshape(g, -1, d, *p.shape[1:]) for p in parts)  # (g, heads_per_group|1, d, [H])
        return torch.cat([q, k, v], dim=1).reshape(-1, *parts[0].shape[1:])
    if kind == "gate_up" and len(parts) == 2:
        return torch.cat(parts, dim=0)
    (t,) = parts
    return t


def _split(spec: ModelSpec, kind: str, full: torch.Tensor, n_parts: int) -> list[torch.Tensor]:
    """Inverse of `_merge`: one full Megatron tensor → its `n_parts` HF tensors."""
    if kind == "qkv":
        g, d = spec.num_key_value_heads, spec.head_dim
        per = spec.num_attention_heads // g
        grouped = full.reshape(g, per + 2, d, *full.shape[1:])
        q, k, v = grouped[:, :per], grouped[:, per : per + 1], grouped[:, per + 1 :]
        return [t.reshape(-1, *full.shape[1:]).contiguous() for t in (q, k, v)]
    if kind == "gate_up" and n_parts == 2:
        return list(full.chunk(2, dim=0))
    if kind == "vocab":
        return [full[: spec.vocab_size]]
    return [full]


def _shard(kind: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    if size == 1 or kind == "rep":
        return full
    if kind == "gate_up":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, 0)[rank], up.chunk(size, 0)[rank]], dim=0)
    return full.chunk(size, dim=1 if kind == "row" else 0)[rank]  # col, qkv (groups contiguous)


def _unshard(kind: str, shards: list[torch.Tensor]) -> torch.Tensor:
    if len(shards) == 1 or kind == "rep":
        return shards[0]
    if kind == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=1 if kind == "row" else 0)


# -- whole-model import / export ---------------------------------------------------------------------------
class _Layout(NamedTuple):
    tp_rank: int
    tp: int
    tp_group: object
    etp_rank: int
    etp: int
    etp_group: object
    ep_rank: int
    ep: int
    ep_group: object
    pp_rank: int
    pp: int
    pp_group: object


def _layout() -> _Layout:
    from megatron.core import parallel_state as ps

    return _Layout(
        ps.get_tensor_model_parallel_rank(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_tensor_model_parallel_group(),
        ps.get_expert_tensor_parallel_rank(),
        ps.get_expert_tensor_parallel_world_size(),
        ps.get_expert_tensor_parallel_group(check_initialized=False),
        ps.get_expert_model_parallel_rank(),
        ps.get_expert_model_parallel_world_size(),
        ps.get_expert_model_parallel_group(check_initialized=False),
        ps.get_pipeline_model_parallel_rank(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_group(),
    )


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The `GPTModel` inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _stage_table(model: torch.nn.Module, spec: ModelSpec, lay: _Layout) -> list[Entry]:
    """The table of what this rank's model holds; the layer offset is the one megatron numbered it with."""
    layers = model.decoder.layers
    offset = layers[0].layer_number - 1 if len(layers) else 0
    return weight_table(
        spec,
        ep_rank=lay.ep_rank,
        ep_size=lay.ep,
        layers=range(offset, offset + len(layers)),
        pre_process=model.pre_process,
        post_process=model.post_process,
        mtp=getattr(model, "mtp_process", False),
    )


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}


def _is_expert(name: str) -> bool:
    return ".local_experts." in name


@torch.no_grad()
def import_hf_weights(model: torch.nn.Module, spec: ModelSpec, hf_state: dict[str, torch.Tensor]) -> None:
    """Copy HF-named tensors (`Glm4MoeForCausalLM.state_dict()` names, plus `model.layers.{N}.*` for the MTP
    layer when the model has one) into this rank's pipeline stage. `hf_state` may hold the whole model or just
    this stage; every tensor of the stage must be covered, and every HF tensor must belong to some stage: a
    mismatch raises, naming the keys."""
    model = _unwrap(model)
    lay = _layout()
    table = _stage_table(model, spec, lay)
    local = _tensors(model)
    uncovered = sorted(set(local) - {e.mcore for e in table})
    needed = {r.name for e in table for r in e.hf}
    anywhere = {r.name for e in weight_table(spec, mtp=bool(model.config.mtp_num_layers)) for r in e.hf}
    missing, unused = sorted(needed - set(hf_state)), sorted(set(hf_state) - anywhere)
    if uncovered or missing or unused:
        raise KeyError(
            f"HF ↔ Megatron table mismatch: megatron tensors not in the table {uncovered[:5]}, "
            f"HF tensors missing {missing[:5]}, HF tensors unused {unused[:5]}"
        )
    for e in table:
        parts = [hf_state[r.name] if r.expert is None else hf_state[r.name][r.expert] for r in e.hf]
        rank, size = (lay.etp_rank, lay.etp) if _is_expert(e.mcore) else (lay.tp_rank, lay.tp)
        shard = _shard(e.kind, _merge(spec, e.kind, parts, model.vocab_size), rank, size)
        target = local[e.mcore]
        if target.shape != shard.shape:
            raise ValueError(f"{e.mcore}: megatron shape {tuple(target.shape)} vs HF-derived {tuple(shard.shape)}")
        target.copy_(shard)


def _gather(t: torch.Tensor, size: int, group) -> list[torch.Tensor]:
    if size == 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def _export_stage(
    model: torch.nn.Module, spec: ModelSpec, lay: _Layout, skip: set[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for this rank's pipeline stage, gathered over TP / expert-TP / EP. Entries whose
    HF names are all in `skip` (already yielded by an earlier stage) are passed over — the same on every rank
    of the stage, so the stage's collectives stay matched."""
    n_local = spec.n_routed_experts // lay.ep
    local = _tensors(model)
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for e in _stage_table(model, spec, lay):
        if all(r.name in skip for r in e.hf):
            continue
        size, group = (lay.etp, lay.etp_group) if _is_expert(e.mcore) else (lay.tp, lay.tp_group)
        shards = _gather(local[e.mcore].detach(), 1 if e.kind == "rep" else size, group)
        for ref, t in zip(e.hf, _split(spec, e.kind, _unshard(e.kind, shards), len(e.hf))):
            if ref.expert is None:
                yield ref.name, t
                continue
            slot = fused.setdefault(ref.name, {})
            for r, t_r in enumerate(_gather(t, lay.ep, lay.ep_group)):  # EP rank r holds experts r·n_local …
                slot[ref.expert + (r - lay.ep_rank) * n_local] = t_r
            if len(slot) == spec.n_routed_experts:
                yield ref.name, torch.stack([slot.pop(j) for j in range(spec.n_routed_experts)])


@torch.no_grad()
def export_stage_weights(model: torch.nn.Module, spec: ModelSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for this rank's pipeline stage only, gathered over TP / expert-TP / EP as
    it goes (a weight sync's per-stage source sends each as it comes; every rank of the stage must iterate it
    to the end). A tensor two stages hold (MTP's shared embedding and head) comes from both."""
    yield from _export_stage(_unwrap(model), spec, _layout(), set())


@torch.no_grad()
def export_hf_weights(model: torch.nn.Module, spec: ModelSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for the whole model (MTP layer included when built), gathered over TP
    (experts: over expert-TP, then EP) and over pipeline stages, first to last; every rank yields the same.
    A fused expert tensor is yielded once all its experts are collected. Under PP each tensor is broadcast from
    its stage with a small header (name, shape, dtype), so receivers need no table of the other stages.
    Tensors of this rank's own stage may be views of the model's storage: copy before changing them."""
    model = _unwrap(model)
    lay = _layout()
    if lay.pp == 1:
        yield from _export_stage(model, spec, lay, set())
        return
    device = next(model.parameters()).device
    seen: set[str] = set()
    for stage in range(lay.pp):
        own = _export_stage(model, spec, lay, seen) if stage == lay.pp_rank else None
        while True:
            item = next(own, None) if own is not None else None
            header = [None if item is None else (item[0], tuple(item[1].shape), item[1].dtype)]
            dist.broadcast_object_list(header, group=lay.pp_group, group_src=stage)
            if header[0] is None:
                break
            name, shape, dtype = header[0]
            t = item[1].contiguous() if item is not None else torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(t, group=lay.pp_group, group_src=stage)
            seen.add(name)
            yield name, t
