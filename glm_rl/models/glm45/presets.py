"""GLM-4.5 family presets: the one source of truth for every architecture number.

A `ModelSpec` holds the numbers; builders turn it into the HF `Glm4MoeConfig` (and, later, the Megatron
config). Parameter counts are computed from the same numbers, so `glm-rl models` can be checked against the
published 355B-A32B / 106B-A12B figures.

What the counts include:
- `total_params`: every weight of the main model (embeddings, LM head, norms, attention incl. QKV bias,
  dense MLPs, router + expert bias, routed and shared experts). The MTP layer is reported separately
  (`mtp_params`), as the published totals leave it out.
- `active_params`: the weights one token touches, excluding embeddings and the LM head (as the published 32B
  / 12B do): attention, norms, dense MLPs, router, the top-k routed experts and the shared experts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import Glm4MoeConfig

ASSETS = Path(__file__).resolve().parents[2] / "assets"
TINY_CHECKPOINT = ASSETS / "glm45-tiny"


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Architecture numbers of one GLM-4.5-family model (field names follow HF `Glm4MoeConfig`)."""

    name: str
    vocab_size: int = 151552
    hidden_size: int
    intermediate_size: int  # FFN of the first dense layers
    num_hidden_layers: int
    first_k_dense_replace: int
    num_attention_heads: int = 96
    num_key_value_heads: int = 8  # query groups (GQA)
    head_dim: int = 128
    partial_rotary_factor: float = 0.5
    rope_theta: float = 1e6
    n_routed_experts: int
    num_experts_per_tok: int = 8
    routed_scaling_factor: float
    moe_intermediate_size: int
    n_shared_experts: int = 1
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    use_qk_norm: bool
    attention_bias: bool = True  # bias on Q/K/V only
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    num_nextn_predict_layers: int = 1  # MTP layers
    hf_checkpoint: str | None = None  # shipped checkpoint, for presets that have one

    # -- HF config ---------------------------------------------------------------------------------------
    def to_hf_config(self, **extra: Any) -> Glm4MoeConfig:
        """Build the HF config with every field set explicitly (HF's defaults differ from GLM-4.5)."""
        fields = {f: getattr(self, f) for f in HF_FIELDS}
        rope = {
            "rope_type": "default",
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
        }
        return Glm4MoeConfig(**fields, rope_parameters=rope, architectures=["Glm4MoeForCausalLM"], **extra)

    @classmethod
    def from_hf_config(cls, config: Glm4MoeConfig | dict, name: str = "custom") -> ModelSpec:
        """Read the architecture numbers back from an HF config (object or config.json dict)."""
        d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        values = {f: d[f] for f in HF_FIELDS if f in d}
        rope = d.get("rope_parameters") or {}
        values["rope_theta"] = rope.get("rope_theta", d.get("rope_theta"))
        values["partial_rotary_factor"] = rope.get("partial_rotary_factor", d.get("partial_rotary_factor"))
        if "head_dim" not in d or d["head_dim"] is None:
            values["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        return cls(name=name, **values)

    def diff(self, other: ModelSpec) -> dict[str, tuple[Any, Any]]:
        """Architecture fields whose values differ: {field: (self's, other's)}."""
        return {f: (getattr(self, f), getattr(other, f)) for f in ARCH_FIELDS if getattr(self, f) != getattr(other, f)}

    # -- parameter counts --------------------------------------------------------------------------------
    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def _attention_params(self) -> int:
        h, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        weights = h * q + 2 * h * kv + q * h
        bias = (q + 2 * kv) if self.attention_bias else 0
        qk_norm = 2 * self.head_dim if self.use_qk_norm else 0
        return weights + bias + qk_norm + 2 * h  # + input / post-attention RMSNorm

    def _expert_params(self, ffn: int) -> int:
        return 3 * self.hidden_size * ffn  # gate, up, down (SiLU GLU)

    def _router_params(self) -> int:
        return self.n_routed_experts * self.hidden_size + self.n_routed_experts  # weight + expert bias

    def _moe_layer_params(self, active: bool) -> int:
        routed = self.num_experts_per_tok if active else self.n_routed_experts
        experts = (routed + self.n_shared_experts) * self._expert_params(self.moe_intermediate_size)
        return self._attention_params() + self._router_params() + experts

    def _dense_layer_params(self) -> int:
        return self._attention_params() + self._expert_params(self.intermediate_size)

    def param_counts(self) -> dict[str, int]:
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        dense = self.first_k_dense_replace * self._dense_layer_params()
        body_total = dense + self.num_moe_layers * self._moe_layer_params(active=False) + self.hidden_size
        body_active = dense + self.num_moe_layers * self._moe_layer_params(active=True) + self.hidden_size
        mtp_extra = 2 * self.hidden_size * self.hidden_size + 3 * self.hidden_size  # eh_proj, enorm, hnorm, norm
        mtp = self.num_nextn_predict_layers * (mtp_extra + self._moe_layer_params(active=False))
        return {"total_params": embed + head + body_total, "active_params": body_active, "mtp_params": mtp}

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            **self.param_counts(),
            "layers": self.num_hidden_layers,
            "dense_layers": self.first_k_dense_replace,
            "hidden": self.hidden_size,
            "experts": self.n_routed_experts,
            "top_k": self.num_experts_per_tok,
            "qk_norm": self.use_qk_norm,
        }
        if self.hf_checkpoint:
            out["hf_checkpoint"] = self.hf_checkpoint
        return out


HF_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(ModelSpec)
    if f.name not in ("name", "hf_checkpoint", "rope_theta", "partial_rotary_factor")
)
ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(ModelSpec) if f.name not in ("name", "hf_checkpoint"))


def glm45_355b_a32b() -> ModelSpec:
    """GLM-4.5 (zai-org/GLM-4.5): 92 layers, first 3 dense, 160 experts, QK-norm, routed scaling 2.5."""
    return ModelSpec(
        name="glm45-355b-a32b",
        hidden_size=5120,
        intermediate_size=12288,
        num_hidden_layers=92,
        first_k_dense_replace=3,
        n_routed_experts=160,
        routed_scaling_factor=2.5,
        moe_intermediate_size=1536,
        use_qk_norm=True,
    )


def glm45_air_106b_a12b() -> ModelSpec:
    """GLM-4.5-Air (zai-org/GLM-4.5-Air): 46 layers, first 1 dense, 128 experts, no QK-norm."""
    return ModelSpec(
        name="glm45-air-106b-a12b",
        hidden_size=4096,
        intermediate_size=10944,
        num_hidden_layers=46,
        first_k_dense_replace=1,
        n_routed_experts=128,
        routed_scaling_factor=1.0,
        moe_intermediate_size=1408,
        use_qk_norm=False,
    )


def glm45_tiny() -> ModelSpec:
    """A ~1M-parameter model with every 355B feature (dense then MoE layers, shared expert, sigmoid router with
    expert bias, QK-norm, partial RoPE, GQA, one MTP layer), trained on the shipped arithmetic task."""
    return ModelSpec(
        name="glm45-tiny",
        vocab_size=32,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        n_routed_experts=8,
        num_experts_per_tok=2,
        routed_scaling_factor=2.5,
        moe_intermediate_size=64,
        use_qk_norm=True,
        max_position_embeddings=128,
        hf_checkpoint=str(TINY_CHECKPOINT),
    )


PRESETS = {spec().name: spec for spec in (glm45_355b_a32b, glm45_air_106b_a12b, glm45_tiny)}


def get_preset(name: str) -> ModelSpec:
    """Look a preset up by name; an unknown name lists the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
