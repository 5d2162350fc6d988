"""Does a recipe's layout run on its documented GPU count? `glm-rl plan`'s trainer checks, applied to a recipe.

The layout goes through Megatron's rules (`glm_rl.planner.estimate.trainer_layout`) and the heaviest pipeline
stage's memory through `glm_rl.planner.estimate.trainer_memory` (bf16 weights, fp32 grads, distributed Adam,
activations with the recipe's recompute). There is no rollout engine in these recipes, so the engine half of
`glm-rl plan` is not used. PEFT: the base is frozen, so grads and optimizer state are only the adapters'; they
are counted from the adapter shapes (rank r on every targeted linear: r × (in + out) per linear, per expert for
routed experts).
"""

from __future__ import annotations

from glm_rl.cluster import HARDWARE
from glm_rl.models.glm45.presets import get_preset
from glm_rl.parallel import layer_split
from glm_rl.planner.estimate import RESERVE_GIB, PlanError, PlanInput, trainer_layout, trainer_memory
from glm_rl.recipes.config import RecipeConfig

GIB = 1 << 30


def _adapter_params(cfg: RecipeConfig) -> int:
    """Adapter parameters of the whole model for `cfg.lora` (attention + dense / shared / routed expert MLPs)."""
    s, r = get_preset(cfg.model.preset), cfg.lora.rank
    h, q, kv = s.hidden_size, s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
    targets = set(cfg.lora.target_modules.split(","))
    attn = r * ((h + q + 2 * kv) if "linear_qkv" in targets else 0) + r * ((q + h) if "linear_proj" in targets else 0)

    def mlp(f: int) -> int:
        return r * ((h + 2 * f) if "linear_fc1" in targets else 0) + r * ((f + h) if "linear_fc2" in targets else 0)

    moe = s.num_moe_layers * (mlp(s.moe_intermediate_size) * (s.n_routed_experts + s.n_shared_experts))
    return s.num_hidden_layers * attn + s.first_k_dense_replace * mlp(s.intermediate_size) + moe


def recipe_plan(cfg: RecipeConfig, hardware: str = "H100", gpus: int | None = None) -> dict:
    """Per-GPU memory of the heaviest stage for `cfg` on `gpus` (default: the recipe's documented count) of
    `hardware`; raises PlanError naming every layout problem or a memory overflow."""
    p, spec = cfg.parallel, get_preset(cfg.model.preset)
    gpus = gpus or p.num_gpus
    hw = HARDWARE[hardware]
    inp = PlanInput(
        spec=spec,
        hardware=hw,
        num_nodes=max(1, gpus // hw.gpus_per_node),
        gpus_per_node=min(gpus, hw.gpus_per_node),
        layout=p.layout(),
        max_tokens_per_gpu=cfg.data.seq_length * cfg.train.micro_batch_size // p.context_parallel_size,
        recompute_granularity=cfg.recompute.granularity,
        recompute_method=cfg.recompute.method,
        recompute_num_layers=cfg.recompute.num_layers,
        enable_mtp_training=cfg.mtp.enabled,
    )
    lo, problems = trainer_layout(inp, gpus)
    if lo is None or problems:
        raise PlanError([f"recipe {cfg.name} on {gpus} GPUs: {x}" for x in problems])
    mem = trainer_memory(inp, lo, layer_split(spec, lo))
    if cfg.peft:  # frozen base: fp32 grads + distributed Adam (12 B) for the adapters only, sharded like the model
        adapters = _adapter_params(cfg) / (lo.tp * lo.pp)
        mem = mem | {"grads": 4 * adapters / GIB, "optimizer": 12 * adapters / (lo.dp * lo.cp) / GIB}
        mem["peak"] = mem["weights"] + mem["grads"] + mem["optimizer"] + mem["activations"]
    total = mem["peak"] + RESERVE_GIB
    if total > hw.gpu_memory_gib:
        raise PlanError(
            [f"recipe {cfg.name} on {gpus} {hardware}: needs {total:.1f} GiB per GPU, has {hw.gpu_memory_gib:.1f} GiB"]
        )
    return {
        "recipe": cfg.name,
        "gpus": gpus,
        "hardware": hardware,
        "dp": lo.dp,
        "gpu_total_gib": total,
        "gpu_capacity_gib": hw.gpu_memory_gib,
        **{k: v for k, v in mem.items() if isinstance(v, float)},
    }
