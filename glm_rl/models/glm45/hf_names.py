"""GLM-4.5 tensor-name rules, each in one place.

- HF files store routed experts one by one (`model.layers.L.mlp.experts.J.{gate,up,down}_proj.weight`); the HF
  model and our Megatron bridge hold them fused (`experts.gate_up_proj` [E, 2F, H], `experts.down_proj`):
  `fuse` / `unfuse`.
- The MTP (nextn) layer is stored as `model.layers.{num_hidden_layers + j}.*`; its embedding and output head
  are copies of the main model's (`mtp_copies`). HF's `MtpModel` names its body differently:
  `mtp_named_tensors` maps it back to checkpoint names.
- Which dim a tensor is split along under tensor / expert parallelism (`split_dim`), and every HF tensor's
  name and shape for a preset without building the model (`hf_tensor_metas`).
"""

from __future__ import annotations

import functools
import re

import torch

from glm_rl.models.glm45.presets import ModelSpec


class ConvertError(ValueError):
    """Input a conversion refuses, named in one message (raised before any heavy work)."""


EXPERT_FILE_NAME = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def mtp_copies(spec: ModelSpec) -> dict[str, str]:
    """MTP-layer file names that hold copies of main-model tensors → the main tensor's name."""
    out = {}
    for j in range(spec.num_nextn_predict_layers):
        p = f"model.layers.{spec.num_hidden_layers + j}."
        out |= {p + "embed_tokens.weight": "model.embed_tokens.weight", p + "shared_head.head.weight": "lm_head.weight"}
    return out


def has_mtp_layer(names, spec: ModelSpec) -> bool:
    prefix = f"model.layers.{spec.num_hidden_layers}."
    return spec.num_nextn_predict_layers > 0 and any(n.startswith(prefix) for n in names)


def fuse(disk: dict[str, torch.Tensor], spec: ModelSpec, where: str) -> dict[str, torch.Tensor]:
    """File names → the bridge's names: per-expert weights stacked, MTP copies of main tensors dropped."""
    out, experts = {}, {}
    for name, t in disk.items():
        if m := EXPERT_FILE_NAME.match(name):
            experts.setdefault(m[1], {})[int(m[2]), m[3]] = t
        else:
            out[name] = t
    for prefix, parts in experts.items():
        want = {(j, p) for j in range(spec.n_routed_experts) for p in ("gate", "up", "down")}
        if set(parts) != want:
            raise ConvertError(
                f"{where}: {prefix}.* holds {len(parts)} expert tensors, expected "
                f"{spec.n_routed_experts} experts × gate/up/down; missing "
                f"{sorted(want - set(parts))[:3]}, unexpected {sorted(set(parts) - want)[:3]}"
            )
        n = spec.n_routed_experts
        out[prefix + ".gate_up_proj"] = torch.stack([torch.cat([parts[j, "gate"], parts[j, "up"]]) for j in range(n)])
        out[prefix + ".down_proj"] = torch.stack([parts[j, "down"] for j in range(n)])
    for copy, main in mtp_copies(spec).items():
        if copy in out:
            if main not in out or not torch.equal(out[copy], out[main]):
                raise ConvertError(
                    f"{where}: {copy} differs from {main}; Megatron's MTP layer shares the main "
                    "model's embedding / output layer, so this checkpoint cannot be represented"
                )
            del out[copy]
    return out


def unfuse(state: dict[str, torch.Tensor], spec: ModelSpec, template_names: set[str]) -> dict[str, torch.Tensor]:
    """Inverse of `fuse`: the bridge's names → file names (MTP copies written where the template has them)."""
    out = {}
    for name, t in state.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix = name.removesuffix(".gate_up_proj")
            for j, (gate, up) in enumerate(x.chunk(2, dim=0) for x in t):
                out[f"{prefix}.{j}.gate_proj.weight"], out[f"{prefix}.{j}.up_proj.weight"] = gate, up
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name.removesuffix(".down_proj")
            out |= {f"{prefix}.{j}.down_proj.weight": x for j, x in enumerate(t)}
        else:
            out[name] = t
    for copy, main in mtp_copies(spec).items():
        if copy in template_names and main in out:
            out[copy] = out[main].clone()  # its own storage: safetensors refuses shared tensors
    return out


def mtp_named_tensors(mtp, num_hidden_layers: int) -> dict[str, torch.Tensor]:
    """The MTP module's tensors under checkpoint names (see the module docstring), sharing its storage."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in mtp.state_dict().items():
        if not name.startswith("layers."):
            continue  # embed_tokens / shared_head: the main model's own tensors
        _, j, rest = name.split(".", 2)
        rest = rest.removeprefix("mtp_block.")
        rest = "shared_head.norm." + rest.removeprefix("post_norm.") if rest.startswith("post_norm.") else rest
        out[f"model.layers.{num_hidden_layers + int(j)}.{rest}"] = tensor
    return out


def split_dim(name: str, shape: tuple[int, ...]) -> int | None:
    """GLM-4.5 (HF names) tensor-parallel / expert-parallel split dim, None for replicated tensors."""
    if ".mlp.experts." in name:  # fused [E, ...] expert tensors: expert parallel
        return 0
    if len(shape) == 0:
        return None
    leaf = name.split(".")[-2] if "." in name else name
    if leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens") or name == "lm_head.weight":
        return 0
    if leaf in ("o_proj", "down_proj"):
        return 1
    return None


@functools.lru_cache(maxsize=4)
def hf_tensor_metas(spec: ModelSpec) -> tuple:
    """Every HF tensor of the model as bf16, in HF's own names and shapes (HF leaves the MTP layer out).
    HF builds one dense and one MoE layer on the meta device; the other layers repeat those two (building all
    92 layers of the 355B, even on meta, takes seconds)."""
    import dataclasses

    import torch
    from transformers import Glm4MoeForCausalLM

    from glm_rl.weights.transfer_plan import TensorMeta

    k = spec.first_k_dense_replace
    small = dataclasses.replace(spec, num_hidden_layers=min(spec.num_hidden_layers, k + 1))
    with torch.device("meta"):
        state = Glm4MoeForCausalLM(small.to_hf_config()).state_dict()
    out = []
    for name, t in state.items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if not m:
            out.append(TensorMeta(name, tuple(t.shape), "bfloat16"))
            continue
        template, rest = int(m.group(1)), m.group(2)
        copies = range(template, template + 1) if template < k else range(k, spec.num_hidden_layers)
        out += [TensorMeta(f"model.layers.{i}.{rest}", tuple(t.shape), "bfloat16") for i in copies]
    return tuple(sorted(out, key=lambda m: (_sync_order(m.name), m.name)))


def _sync_order(name: str) -> tuple:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return (1, int(m.group(1))) if m else ((0, 0) if "embed" in name else (2, 0))
