"""The GLM-4.5-shaped random-init reference model the benchmarks share (engine_decode.py, rl_step_vs_trl.py).

`default` is the 1.06 B model of FACTS.md's HF baseline: hidden 1024, 8 layers (the first dense, FFN 4096),
64 experts top-8, MoE FFN 512, 8 heads / 2 KV groups, QK-norm, vocab 151552. A description overrides fields by
name (`hidden=128,layers=2,...`) or by position (in the order of RANDOM_DEFAULTS), so a benchmark can be
smoke-tested on a CPU with a tiny model of the same shape family.
"""

from __future__ import annotations

from glm_rl.models.glm45.presets import ModelSpec

RANDOM_DEFAULTS = {
    "hidden": 1024,
    "layers": 8,
    "experts": 64,
    "top_k": 8,
    "ffn": 512,
    "vocab": 151552,
    "heads": 8,
    "kv_heads": 2,
    "dense_ffn": 4096,
}


def random_spec(desc: str, flag: str = "--random-model") -> ModelSpec:
    """A GLM-4.5-shaped spec from 'default', 'k=v,...' or positional numbers (in the order of RANDOM_DEFAULTS);
    `flag` names the option in the error for an unknown field."""
    values = dict(RANDOM_DEFAULTS)
    if desc != "default":
        for i, part in enumerate(p for p in desc.split(",") if p):
            key, _, value = part.rpartition("=")
            key = key or list(RANDOM_DEFAULTS)[i]
            if key not in RANDOM_DEFAULTS:
                raise SystemExit(f"{flag}: unknown field {key!r}; fields: {', '.join(RANDOM_DEFAULTS)}")
            values[key] = int(value)
    v = values
    return ModelSpec(
        name="random",
        vocab_size=v["vocab"],
        hidden_size=v["hidden"],
        intermediate_size=v["dense_ffn"],
        num_hidden_layers=v["layers"],
        first_k_dense_replace=1,
        num_attention_heads=v["heads"],
        num_key_value_heads=v["kv_heads"],
        head_dim=v["hidden"] // v["heads"],
        n_routed_experts=v["experts"],
        num_experts_per_tok=v["top_k"],
        routed_scaling_factor=2.5,
        moe_intermediate_size=v["ffn"],
        use_qk_norm=True,
        max_position_embeddings=4096,
    )
