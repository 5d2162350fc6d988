"""`glm-rl plan`: will this layout run, how much memory does each GPU need, how long does a weight sync take?

The layout is checked with Megatron's rules (`glm_rl.parallel.validate_layout`, `layer_split`) first, in
milliseconds. Then a per-GPU memory estimate for the heaviest pipeline stage, from the preset's shapes:

- weights: bf16 (2 B/param). A stage's non-expert parameters are split over TP (norms and the router are
  replicated), its routed experts over EP x ETP; embeddings sit on the first stage, the LM head (and the MTP
  layer with --enable-mtp-training) on the last. Vocab rows are padded as Megatron pads them.
- grads: fp32 main grads (4 B/param), Megatron's DDP with --accumulate-allreduce-grads-in-fp32 (slime's
  recipes set it); not sharded.
- optimizer: the distributed optimizer, fp32 master weights + Adam m, v = 12 B/param, sharded over DP x CP
  (dense) or the expert-DP group (experts). --optimizer-cpu-offload puts it on the host (with an fp32 grad
  copy: 16 B/param), reported per node.
- activations: bytes kept per token per layer (bf16), the sum of the tensors backward needs, all divided by TP
  (sequence parallel shards h-wide tensors over tokens; heads and FFN columns are TP-split; with ETP 1 each
  rank's experts receive on average its own tokens x top-k):
    attention  2h (layer input) + 2h (norm out) + 2(q + 2kv) (Q, K, V for flash attention) + 2q (attention
               out) + 4 heads (fp32 log-sum-exp)
    MoE MLP    2h + 2h + 8E (fp32 router logits, probs) + k (2h + 6f) (permuted input, fc1 gate/up, act) +
               6 f_shared
    dense MLP  2h + 2h + 6F
  `--recompute-granularity full`: only each recomputed block's input (2h / TP per token) is kept, plus one
  block's full activations while it is recomputed; `selective`: core attention (Q, K, V, LSE) is recomputed.
  1F1B keeps PP - stage micro-batches in flight (assumes at least PP micro-batches). --max-tokens-per-gpu is
  the tokens one GPU holds per micro-batch (slime's meaning: after the CP split). The last stage adds fp32
  logits and their grad (8 B per vocab entry / TP).
- rollout engine: weights (bf16, all experts and MTP with --enable-mtp) split evenly over the engine's GPUs,
  and a KV-cache pool = --sglang-mem-fraction-static x GPU memory - weights; KV heads are replicated when the
  engine TP exceeds them. The pool must hold --max-tokens-per-gpu tokens (one longest sample).
- colocated (--colocate): trainer and engine take turns on each GPU (`glm_rl/colocation.py`): during rollout the
  trainer has moved its weights and GPU optimizer state to pinned host memory and dropped its gradients (host:
  2 B/param + the 12 B/param of Adam state when it lives on the GPU); during training the engine has released
  weights, KV cache and graphs. The GPU needs max(training peak, engine pool) plus both processes' runtime
  reserve, which covers what each keeps while the other works (measured on an H100: trainer 0.06 GiB, engine
  < 1.2 GiB).
- reserve: RESERVE_GIB per process (CUDA context, NCCL buffers, CUDA graphs, allocator slack).

Weight sync: `glm_rl/planner/sync.py` (`predict_sync`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from glm_rl.cluster import GIB, Hardware
from glm_rl.models.glm45.presets import ModelSpec
from glm_rl.parallel import ParallelLayout, layer_split, padded_vocab_size, validate_layout
from glm_rl.planner.sync import predict_sync

RESERVE_GIB = 3.0  # per process on a GPU
MIN_MEM_FRACTION = 0.5  # below this SGLang's static pool is too small to be worth planning


class PlanError(ValueError):
    """A plan that cannot run: `problems` lists each reason."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(problems))


@dataclass(frozen=True, kw_only=True)
class PlanInput:
    spec: ModelSpec
    hardware: Hardware
    num_nodes: int
    gpus_per_node: int
    layout: ParallelLayout  # dp is derived from the trainer GPUs
    max_tokens_per_gpu: int = 16384
    recompute_granularity: str | None = None  # None, "full", "selective"
    recompute_method: str = "uniform"  # with full: "uniform" or "block"
    recompute_num_layers: int = 1
    optimizer_cpu_offload: bool = False
    enable_mtp_training: bool = False
    colocate: bool = False
    rollout_num_gpus: int | None = None  # disaggregated: GPUs for engines (colocated: all of them)
    rollout_num_gpus_per_engine: int = 8
    enable_mtp: bool = False
    mem_fraction_static: float = 0.7
    update_weight_transfer_mode: str = "p2p"

    @property
    def total_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node


@dataclass
class Plan:
    """Everything `glm-rl plan` reports; GiB unless named otherwise."""

    model: str
    hardware: str
    gpus: dict
    layout: dict
    layers_per_stage: list[int]
    trainer: dict  # per GPU of the heaviest stage
    engine: dict  # per engine GPU
    gpu_total_gib: float
    gpu_capacity_gib: float
    host_per_node_gib: float
    host_capacity_gib: float
    sync: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return asdict(self) | {"fits": self.fits}


# -- inputs ---------------------------------------------------------------------------------------------------
def split_gpus(p: PlanInput) -> tuple[int, int, int, list[str]]:
    """(trainer GPUs, engine GPUs, engines, problems naming the flags)."""
    total, per = p.total_gpus, p.rollout_num_gpus_per_engine
    rollout = total if p.colocate else (p.rollout_num_gpus or 0)
    errors = []
    if per < 1:
        errors.append(f"--rollout-num-gpus-per-engine must be >= 1 (got {per})")
    elif p.colocate and p.rollout_num_gpus not in (None, total):
        errors.append(f"--colocate shares all {total} GPUs; drop --rollout-num-gpus {p.rollout_num_gpus}")
    elif not p.colocate and not 0 < rollout < total:
        errors.append(
            f"without --colocate, --rollout-num-gpus must be between 1 and {total - 1} "
            f"(the GPUs left train); got {p.rollout_num_gpus}"
        )
    elif rollout % per:
        errors.append(f"{rollout} rollout GPUs do not split into engines of --rollout-num-gpus-per-engine {per}")
    if not 0 < p.mem_fraction_static < 1:
        errors.append(f"--sglang-mem-fraction-static must be in (0, 1) (got {p.mem_fraction_static})")
    if p.update_weight_transfer_mode == "tensor" and not p.colocate:
        errors.append("--update-weight-transfer-mode tensor needs --colocate (CUDA IPC is GPU-local)")
    trainer = total if p.colocate else total - rollout
    return trainer, rollout, rollout // max(per, 1), errors


def trainer_layout(p: PlanInput, trainer_gpus: int) -> tuple[ParallelLayout | None, list[str]]:
    """The layout with DP derived from the trainer GPUs, and every reason Megatron would refuse it."""
    lo = p.layout
    fields = {k: v for k, v in asdict(lo).items() if k != "dp"}
    model = lo.tp * lo.pp * lo.cp
    if trainer_gpus < 1 or model < 1 or trainer_gpus % model:
        # still check the per-model rules (heads, experts, layers) with DP 1, so one run names every fix
        problems = validate_layout(p.spec, ParallelLayout(dp=1, **fields))
        return None, [
            f"{trainer_gpus} trainer GPUs are not divisible by TP {lo.tp} x PP {lo.pp} x CP {lo.cp} "
            f"= {model}, so no whole DP"
        ] + problems
    layout = ParallelLayout(dp=trainer_gpus // model, **fields)
    return layout, validate_layout(
        p.spec, layout, world_size=trainer_gpus, seq_len=p.max_tokens_per_gpu * max(lo.cp, 1)
    )


# -- memory ---------------------------------------------------------------------------------------------------
def _stage_params(spec: ModelSpec, lo: ParallelLayout, stage: int, layers: list[int], mtp: bool) -> tuple[float, float]:
    """(non-expert, expert) parameters one GPU of `stage` holds."""
    first = sum(layers[:stage])
    ids = range(first, first + layers[stage])
    moe = sum(1 for i in ids if i >= spec.first_k_dense_replace)
    dense = len(ids) - moe
    h = spec.hidden_size
    norms_router = len(ids) * 2 * h + moe * spec._router_params()
    sharded = (
        len(ids) * (spec._attention_params() - 2 * h)
        + dense * spec._expert_params(spec.intermediate_size)
        + moe * spec.n_shared_experts * spec._expert_params(spec.moe_intermediate_size)
    )
    experts = moe * spec.n_routed_experts * spec._expert_params(spec.moe_intermediate_size)
    vocab_rows = padded_vocab_size(spec, lo.tp) * h
    if stage == 0:
        sharded += vocab_rows
    if stage == lo.pp - 1:
        sharded += vocab_rows * (0 if spec.tie_word_embeddings else 1)
        norms_router += h
        if mtp:  # an MoE layer plus eh_proj (2h x h) and three norms
            sharded += (
                spec._attention_params()
                - 2 * h
                + 2 * h * h
                + spec.n_shared_experts * spec._expert_params(spec.moe_intermediate_size)
            )
            norms_router += 2 * h + spec._router_params() + 3 * h
            experts += spec.n_routed_experts * spec._expert_params(spec.moe_intermediate_size)
    return norms_router + sharded / lo.tp, experts / (lo.ep * lo.etp)


def _layer_bytes_per_token(spec: ModelSpec, moe: bool, selective: bool) -> float:
    """Activation bytes one layer keeps per token (before the TP split); see the module docstring."""
    h, q, kv = spec.hidden_size, spec.num_attention_heads * spec.head_dim, spec.num_key_value_heads * spec.head_dim
    core = 2 * (q + 2 * kv) + 4 * spec.num_attention_heads
    attn = 4 * h + 2 * q + (0 if selective else core)
    if moe:
        f, fs = spec.moe_intermediate_size, spec.moe_intermediate_size * spec.n_shared_experts
        mlp = 4 * h + 8 * spec.n_routed_experts + spec.num_experts_per_tok * (2 * h + 6 * f) + 6 * fs
    else:
        mlp = 4 * h + 6 * spec.intermediate_size
    return attn + mlp


def _activations(p: PlanInput, lo: ParallelLayout, stage: int, layers: list[int]) -> float:
    """Activation bytes one GPU of `stage` holds at its peak."""
    spec, tokens = p.spec, p.max_tokens_per_gpu
    first = sum(layers[:stage])
    ids = list(range(first, first + layers[stage]))
    if p.enable_mtp_training and stage == lo.pp - 1:
        ids.append(spec.num_hidden_layers)  # the MTP layer is an MoE layer
    per_layer = [
        _layer_bytes_per_token(spec, i >= spec.first_k_dense_replace, p.recompute_granularity == "selective")
        * tokens
        / lo.tp
        for i in ids
    ]
    layer_input = 2 * spec.hidden_size * tokens / lo.tp
    if p.recompute_granularity == "full":
        n = max(1, p.recompute_num_layers)
        if p.recompute_method == "block":  # the first n layers each keep their input, the rest everything
            kept = layer_input * min(n, len(ids)) + sum(per_layer[n:])
            working = max(per_layer[:n], default=0)
        else:  # uniform: every chunk of n layers keeps only its input
            kept = layer_input * -(-len(ids) // n)
            working = max((sum(per_layer[i : i + n]) for i in range(0, len(ids), n)), default=0)
        stored = kept
    else:  # none, or selective (its saving is already in per_layer)
        stored, working = sum(per_layer), 0.0
    in_flight = lo.pp - stage
    logits = 0.0
    if stage == lo.pp - 1:
        heads = 2 if p.enable_mtp_training else 1
        logits = heads * 8 * tokens * padded_vocab_size(spec, lo.tp) / lo.tp
    return stored * in_flight + working + logits


def trainer_memory(p: PlanInput, lo: ParallelLayout, layers: list[int]) -> dict:
    """Per-GPU trainer memory (GiB) of the heaviest stage, and the host memory its CPU state needs."""
    dense_dp = lo.dp * lo.cp
    expert_dp = lo.tp * lo.cp * lo.dp // (lo.etp * lo.ep)
    rows = []
    for stage in range(lo.pp):
        dense, experts = _stage_params(p.spec, lo, stage, layers, p.enable_mtp_training)
        params = dense + experts
        opt_share = dense / dense_dp + experts / expert_dp
        row_optimizer = 0.0 if p.optimizer_cpu_offload else 12 * opt_share / GIB
        row = {
            "stage": stage,
            "params_b": params / 1e9,
            "weights": 2 * params / GIB,
            "grads": 4 * params / GIB,
            "optimizer": row_optimizer,
            "activations": _activations(p, lo, stage, layers) / GIB,
            "host_optimizer": (16 * opt_share / GIB) if p.optimizer_cpu_offload else 0.0,
            # colocated: weights and the GPU's optimizer state wait in pinned host memory during rollout
            "host_offload": (2 * params / GIB + row_optimizer) if p.colocate else 0.0,
        }
        row["peak"] = row["weights"] + row["grads"] + row["optimizer"] + row["activations"]
        rows.append(row)
    worst = max(rows, key=lambda r: r["peak"])
    host_per_gpu = max(r["host_optimizer"] + r["host_offload"] for r in rows)
    return worst | {"host_per_gpu": host_per_gpu}


def engine_memory(p: PlanInput, engine_gpus_each: int) -> dict:
    """Per-GPU memory of one engine rank (GiB) and the tokens its KV pool holds."""
    spec = p.spec
    counts = spec.param_counts()
    params = counts["total_params"] + (counts["mtp_params"] if p.enable_mtp else 0)
    weights = 2 * params / engine_gpus_each / GIB
    pool = p.mem_fraction_static * p.hardware.gpu_memory_gib
    kv_heads = max(1, spec.num_key_value_heads // engine_gpus_each)
    layers = spec.num_hidden_layers + (spec.num_nextn_predict_layers if p.enable_mtp else 0)
    kv_per_token = layers * 2 * kv_heads * spec.head_dim * 2
    kv = max(0.0, pool - weights)
    return {
        "gpus_per_engine": engine_gpus_each,
        "weights": weights,
        "kv_cache": kv,
        "pool": pool,
        "kv_tokens": int(kv * GIB // kv_per_token),
        "kv_bytes_per_token": kv_per_token,
    }


# -- the plan -------------------------------------------------------------------------------------------------
def make_plan(p: PlanInput, *, with_sync: bool = True, progress=None) -> Plan:
    """Check the layout (PlanError listing every reason when it cannot run at all), then size memory and sync.
    A plan that does not fit comes back with `problems` set (the caller decides the exit code)."""
    trainer_gpus, rollout_gpus, engines, problems = split_gpus(p)
    lo, layout_problems = trainer_layout(p, trainer_gpus) if trainer_gpus > 0 else (None, [])
    if problems or layout_problems or lo is None:
        raise PlanError(problems + layout_problems)
    layers = layer_split(p.spec, lo)
    trainer = trainer_memory(p, lo, layers)
    engine = engine_memory(p, p.rollout_num_gpus_per_engine)
    hw, cap = p.hardware, p.hardware.gpu_memory_gib
    if p.colocate:
        total = max(trainer["peak"], engine["pool"]) + 2 * RESERVE_GIB
    else:
        total = max(trainer["peak"], engine["pool"]) + RESERVE_GIB  # the larger of the two GPU kinds
    host = trainer["host_per_gpu"] * min(p.gpus_per_node, trainer_gpus)
    problems = _fit_problems(p, trainer, engine, total, host)
    plan = Plan(
        model=p.spec.name,
        hardware=hw.name,
        gpus={
            "nodes": p.num_nodes,
            "per_node": p.gpus_per_node,
            "trainer": trainer_gpus,
            "rollout": rollout_gpus,
            "engines": engines,
            "colocate": p.colocate,
        },
        layout={
            "tp": lo.tp,
            "pp": lo.pp,
            "cp": lo.cp,
            "ep": lo.ep,
            "etp": lo.etp,
            "dp": lo.dp,
            "sequence_parallel": lo.sequence_parallel,
            "expert_dp": lo.tp * lo.cp * lo.dp // (lo.ep * lo.etp),
        },
        layers_per_stage=layers,
        trainer=trainer,
        engine=engine,
        gpu_total_gib=total,
        gpu_capacity_gib=cap,
        host_per_node_gib=host,
        host_capacity_gib=hw.host_memory_gib,
        problems=problems,
    )
    if with_sync:
        if progress:
            progress("pricing the weight-sync transfer plan (a few seconds for the large presets)...")
        plan.sync = predict_sync(p, lo, trainer_gpus, engines)
    return plan


def _fit_problems(p: PlanInput, trainer: dict, engine: dict, total: float, host: float) -> list[str]:
    cap, name = p.hardware.gpu_memory_gib, p.hardware.name
    out = []
    if total > cap:
        what = "training peak" if trainer["peak"] >= engine["pool"] else "engine pool"
        fixes = ["add GPUs or raise TP/PP/EP"]
        fixes += [] if p.recompute_granularity == "full" else ["turn on --recompute-granularity full"]
        fixes += [] if p.optimizer_cpu_offload else ["turn on --optimizer-cpu-offload"]
        out.append(
            f"needs {total:.1f} GiB per GPU ({what} + reserve), {name} has {cap:.1f} GiB: "
            f"{', '.join(fixes)} or lower --max-tokens-per-gpu"
        )
    if engine["weights"] >= engine["pool"]:
        out.append(
            f"engine weights {engine['weights']:.1f} GiB per GPU do not fit the SGLang pool "
            f"({p.mem_fraction_static} x {cap:.1f} GiB): raise --rollout-num-gpus-per-engine"
        )
    elif engine["kv_tokens"] < p.max_tokens_per_gpu:
        out.append(
            f"KV cache holds {engine['kv_tokens']} tokens per engine GPU, fewer than one "
            f"{p.max_tokens_per_gpu}-token sample: raise --rollout-num-gpus-per-engine or "
            f"--sglang-mem-fraction-static"
        )
    if p.mem_fraction_static < MIN_MEM_FRACTION:
        out.append(f"--sglang-mem-fraction-static {p.mem_fraction_static} < {MIN_MEM_FRACTION}")
    if host > p.hardware.host_memory_gib:
        out.append(
            f"needs {host:.0f} GiB of host memory per node (CPU optimizer / offloaded weights), a {name} "
            f"node has {p.hardware.host_memory_gib:.0f} GiB"
        )
    return out


__all__ = [
    "PlanInput",
    "Plan",
    "PlanError",
    "make_plan",
    "split_gpus",
    "trainer_layout",
    "trainer_memory",
    "engine_memory",
    "predict_sync",
    "RESERVE_GIB",
]
