"""Megatron parallel layout for GLM-4.5: the sizes, and every rule a layout must meet before a model is built.

A `ParallelLayout` holds TP / PP / CP / EP / expert-TP / DP, sequence parallelism and Megatron's uneven
pipeline split. `validate_layout` checks it against a `ModelSpec` and returns every problem at once, each
message naming the numbers, so a bad layout fails in milliseconds at parse time (trainer backend, converters,
`glm-rl plan`) instead of minutes into process-group setup or inside a deep Megatron assert.

The rules are megatron-core 0.19.2's own, read from its source:
- `parallel_state.initialize_model_parallel`: world = TP×PP×CP×DP; the expert grid ETP×EP×PP×expert-DP is
  carved from the same ranks, so ETP×EP must divide TP×CP×DP (the ranks of one pipeline stage).
- `TransformerConfig.__post_init__`: heads % TP; query groups a multiple *or* a divisor of TP (TP > groups
  replicates KV heads); uneven PP: first/last ≥ 1 and the remaining layers split evenly over the middle stages.
- `ModelParallelConfig.__post_init__`: sequence parallelism needs TP > 1.
- `MoELayer.forward`: training an MoE with TP > 1 and no sequence parallelism raises.
- `MoELayer.__init__`: experts % EP. Column/row-parallel linears `divide()` their FFN width by (E)TP.
- CP splits each sequence into 2×CP load-balanced chunks (with SP, also over TP): `rope_utils`,
  `multimodal/context_parallel.py`.
- Vocab is padded, never rejected: `vocab_size_with_padding` rounds up to 128×TP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from glm_rl.models.glm45.presets import ModelSpec

MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128  # Megatron's default --make-vocab-size-divisible-by


class LayoutError(ValueError):
    """A parallel layout that cannot work; `problems` lists each reason."""

    def __init__(self, problems: list[str], name: str = "model"):
        self.problems = list(problems)
        super().__init__(f"invalid parallel layout for {name}:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True, kw_only=True)
class ParallelLayout:
    """Megatron parallel sizes. Each field is one Megatron flag:

    tp  --tensor-model-parallel-size     pp  --pipeline-model-parallel-size
    cp  --context-parallel-size          ep  --expert-model-parallel-size
    etp --expert-tensor-parallel-size    dp  (not a flag: world / (TP×PP×CP))
    sequence_parallel                    --sequence-parallel
    decoder_first_pipeline_num_layers    --decoder-first-pipeline-num-layers
    decoder_last_pipeline_num_layers     --decoder-last-pipeline-num-layers

    `etp` defaults to 1 (GLM-4.5 recipes keep whole experts per rank); Megatron's own default is TP, so the
    flag is always emitted by `megatron_args`.
    """

    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    decoder_first_pipeline_num_layers: int | None = None
    decoder_last_pipeline_num_layers: int | None = None

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @classmethod
    def for_world_size(cls, world_size: int, **fields) -> ParallelLayout:
        """Derive DP from the GPU count, as Megatron does; a count TP×PP×CP does not divide is an error."""
        model = fields.get("tp", 1) * fields.get("pp", 1) * fields.get("cp", 1)
        if model < 1 or world_size < 1 or world_size % model:
            raise LayoutError(
                [
                    f"world size {world_size} is not divisible by TP {fields.get('tp', 1)} × "
                    f"PP {fields.get('pp', 1)} × CP {fields.get('cp', 1)} = {model}, so no whole DP"
                ]
            )
        return cls(dp=world_size // model, **fields)

    def megatron_args(self) -> list[str]:
        """The layout as Megatron command-line flags (DP is implied by the world size)."""
        args = [
            "--tensor-model-parallel-size",
            str(self.tp),
            "--pipeline-model-parallel-size",
            str(self.pp),
            "--context-parallel-size",
            str(self.cp),
            "--expert-model-parallel-size",
            str(self.ep),
            "--expert-tensor-parallel-size",
            str(self.etp),
        ]
        if self.sequence_parallel:
            args.append("--sequence-parallel")
        if self.decoder_first_pipeline_num_layers is not None:
            args += ["--decoder-first-pipeline-num-layers", str(self.decoder_first_pipeline_num_layers)]
        if self.decoder_last_pipeline_num_layers is not None:
            args += ["--decoder-last-pipeline-num-layers", str(self.decoder_last_pipeline_num_layers)]
        return args


# -- layers over pipeline stages -----------------------------------------------------------------------------
def _split(layers: int, pp: int, first: int | None, last: int | None) -> tuple[list[int] | None, str | None]:
    """Layers per stage, or the reason there is none (Megatron's uneven-PP rule)."""
    if first is None and last is None:
        if layers % pp:
            hint = _balanced_ends(layers, pp)
            tip = (
                (
                    f"; e.g. --decoder-first-pipeline-num-layers {hint[0]} --decoder-last-pipeline-num-layers "
                    f"{hint[-1]} gives {hint}"
                )
                if hint
                else ""
            )
            return None, (
                f"num_hidden_layers {layers} is not divisible by --pipeline-model-parallel-size {pp} "
                f"({layers} / {pp} = {layers / pp:g}){tip}"
            )
        return [layers // pp] * pp, None
    if pp < 2:
        return None, "--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1"
    ends = [("first", first), ("last", last)]
    for label, n in ends:
        if n is not None and n < 1:
            return None, f"--decoder-{label}-pipeline-num-layers {n} must be ≥ 1"
    rest = layers - (first or 0) - (last or 0)
    middle = pp - sum(n is not None for _, n in ends)
    given = " and ".join(f"{label} stage {n}" for label, n in ends if n is not None)
    where = f"num_hidden_layers {layers} minus {given} leaves {rest} layers for {middle} middle stages"
    if middle == 0:
        if rest:
            return None, f"{where}: with --pipeline-model-parallel-size {pp} they must add up to {layers}"
    elif rest < middle:
        return None, f"{where}: every stage needs ≥ 1 layer"
    elif rest % middle:
        return None, f"{where}: {rest} is not divisible by {middle} ({rest} / {middle} = {rest / middle:g})"
    per = rest // middle if middle else 0
    mid = [per] * middle
    split = ([first] if first is not None else []) + mid + ([last] if last is not None else [])
    return split, None


def _balanced_ends(layers: int, pp: int) -> list[int] | None:
    """The most even valid split with both ends set (ties: equal ends, then lighter ends, which also hold the
    embedding / LM head and MTP). None if PP < 3 leaves nothing to balance."""
    best = None
    for f in range(1, layers):
        for last in range(1, layers - f):
            rest = layers - f - last
            if pp < 3 or rest < pp - 2 or rest % (pp - 2):
                continue
            key = (max(f, last, rest // (pp - 2)), abs(f - last), f + last)
            if best is None or key < best[0]:
                best = (key, [f] + [rest // (pp - 2)] * (pp - 2) + [last])
    return best[1] if best else None


def layer_split(spec: ModelSpec, layout: ParallelLayout) -> list[int]:
    """Decoder layers on each pipeline stage, first to last (the MTP layer rides on the last stage and is not
    counted). Raises `LayoutError` when the layers cannot be split."""
    split, problem = _split(
        spec.num_hidden_layers,
        layout.pp,
        layout.decoder_first_pipeline_num_layers,
        layout.decoder_last_pipeline_num_layers,
    )
    if problem:
        raise LayoutError([problem], spec.name)
    return split


def local_experts(spec: ModelSpec, layout: ParallelLayout) -> int:
    """Routed experts held by each EP rank (Megatron gives rank r experts [r·n, (r+1)·n))."""
    if spec.n_routed_experts % layout.ep:
        raise LayoutError([_experts_problem(spec, layout)], spec.name)
    return spec.n_routed_experts // layout.ep


def padded_vocab_size(spec: ModelSpec, tp: int, divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY) -> int:
    """Vocab rows Megatron allocates: rounded up to divisible_by × TP so every TP shard is equal and aligned.
    Not an error: the extra rows are dummies (the HF bridge must drop them on export)."""
    multiple = divisible_by * tp
    return math.ceil(spec.vocab_size / multiple) * multiple


# -- validation ------------------------------------------------------------------------------------------------
def _experts_problem(spec: ModelSpec, layout: ParallelLayout) -> str:
    return (
        f"n_routed_experts {spec.n_routed_experts} is not divisible by --expert-model-parallel-size "
        f"{layout.ep} ({spec.n_routed_experts} / {layout.ep} = {spec.n_routed_experts / layout.ep:g})"
    )


def _size_problems(layout: ParallelLayout) -> list[str]:
    names = {
        "tp": "--tensor-model-parallel-size",
        "pp": "--pipeline-model-parallel-size",
        "cp": "--context-parallel-size",
        "ep": "--expert-model-parallel-size",
        "etp": "--expert-tensor-parallel-size",
        "dp": "data-parallel size",
    }
    return [
        f"{flag} {getattr(layout, f)} must be an integer ≥ 1"
        for f, flag in names.items()
        if not isinstance(getattr(layout, f), int) or getattr(layout, f) < 1
    ]


def _tensor_problems(spec: ModelSpec, lo: ParallelLayout) -> list[str]:
    """Everything TP / expert-TP split: heads, query groups, FFN widths."""
    tp, out = lo.tp, []
    if spec.num_attention_heads % tp:
        out.append(
            f"num_attention_heads {spec.num_attention_heads} is not divisible by --tensor-model-parallel-size {tp}"
        )
    groups = spec.num_key_value_heads
    if groups % tp and tp % groups:
        out.append(
            f"num_key_value_heads (query groups) {groups} is neither a multiple nor a divisor of "
            f"--tensor-model-parallel-size {tp}"
        )
    widths = {
        "intermediate_size (dense MLP)": (spec.intermediate_size, tp, "--tensor-model-parallel-size"),
        "shared expert width": (spec.moe_intermediate_size * spec.n_shared_experts, tp, "--tensor-model-parallel-size"),
        "moe_intermediate_size": (spec.moe_intermediate_size, lo.etp, "--expert-tensor-parallel-size"),
    }
    for what, (width, size, flag) in widths.items():
        if width and width % size:
            out.append(f"{what} {width} is not divisible by {flag} {size}")
    return out


def _expert_problems(spec: ModelSpec, lo: ParallelLayout) -> list[str]:
    out = [_experts_problem(spec, lo)] if spec.n_routed_experts % lo.ep else []
    stage_ranks, expert_group = lo.tp * lo.cp * lo.dp, lo.etp * lo.ep
    if stage_ranks % expert_group:
        out.append(
            f"--expert-tensor-parallel-size {lo.etp} × --expert-model-parallel-size {lo.ep} = "
            f"{expert_group} does not divide the {stage_ranks} ranks of a pipeline stage "
            f"(TP {lo.tp} × CP {lo.cp} × DP {lo.dp}) that Megatron carves the expert grid from"
        )
    return out


def _sequence_problems(spec: ModelSpec, lo: ParallelLayout, seq_len: int | None) -> list[str]:
    out = []
    if lo.sequence_parallel and lo.tp == 1:
        out.append("--sequence-parallel needs --tensor-model-parallel-size > 1 (it is 1)")
    if spec.n_routed_experts and lo.tp > 1 and not lo.sequence_parallel:
        out.append(
            f"MoE with --tensor-model-parallel-size {lo.tp} needs --sequence-parallel "
            "(megatron-core's MoELayer refuses to train without it)"
        )
    if seq_len is not None:
        chunks = 2 * lo.cp if lo.cp > 1 else 1
        multiple = chunks * (lo.tp if lo.sequence_parallel else 1)
        if seq_len % multiple:
            parts = ([f"2 × CP {lo.cp}"] if lo.cp > 1 else []) + ([f"TP {lo.tp} (SP)"] if lo.sequence_parallel else [])
            out.append(f"sequence length {seq_len} is not a multiple of {' × '.join(parts)} = {multiple}")
    return out


def validate_layout(
    spec: ModelSpec, layout: ParallelLayout, *, world_size: int | None = None, seq_len: int | None = None
) -> list[str]:
    """Every reason `layout` cannot run `spec` (empty when it can). `world_size`: the GPUs the job has;
    `seq_len`: a (padded) sequence length to check against CP/SP chunking. Checks all rules, so one run of
    `glm-rl plan` names every fix."""
    if sizes := _size_problems(layout):
        return sizes  # the divisibility checks below would divide by these
    out = []
    if world_size is not None and world_size != layout.world_size:
        out.append(
            f"world size {world_size} != TP {layout.tp} × PP {layout.pp} × CP {layout.cp} × "
            f"DP {layout.dp} = {layout.world_size}"
        )
    out += _tensor_problems(spec, layout)
    out += _expert_problems(spec, layout)
    _, layers = _split(
        spec.num_hidden_layers,
        layout.pp,
        layout.decoder_first_pipeline_num_layers,
        layout.decoder_last_pipeline_num_layers,
    )
    out += [layers] if layers else []
    out += _sequence_problems(spec, layout, seq_len)
    return out


def check_layout(
    spec: ModelSpec, layout: ParallelLayout, *, world_size: int | None = None, seq_len: int | None = None
) -> None:
    """`validate_layout`, raising `LayoutError` with all problems: call it before building any model."""
    if problems := validate_layout(spec, layout, world_size=world_size, seq_len=seq_len):
        raise LayoutError(problems, spec.name)
