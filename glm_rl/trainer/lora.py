"""LoRA and DoRA adapters for HF GLM-4.5 (`Glm4MoeForCausalLM`), written here (no `peft` dependency).

The math is three small functions on weights shaped (..., out, in) so a Megatron linear wrapper can reuse them:
- LoRA (Hu et al. 2021): W' = W + s·B·A with s = alpha / rank, A (r, in) Kaiming-uniform, B (out, r) zeros,
  so a fresh adapter changes nothing.
- DoRA (Liu et al. 2024, eq. 5): W' = m · V / ||V||, V = W + s·B·A. The norm is taken per OUTPUT feature, i.e.
  over the input dimension: one norm per row of torch's (out, in) weight (the paper's column norm of its
  d×k W, which multiplies from the right). m starts as ||W|| per row, so a fresh adapter is the identity
  (m / ||W|| is exactly 1.0). The norm is not detached (exact gradients; the paper's detach is a memory trick).

`apply_lora` swaps target modules for wrappers that keep the original module as `.base` (frozen):
- `q_proj k_proj v_proj o_proj` (attention) and `gate_proj up_proj down_proj` (the dense MLP and the shared
  expert) are `nn.Linear`: `LoRALinear` adds s·B·A·dropout(x) to the base output (DoRA: rescales by m/||V||).
- `experts` (routed experts, fused 3-D `gate_up_proj` (E, 2F, H) and `down_proj` (E, H, F)): `LoRAExperts`
  gives each expert its own rank-r delta on each of the two fused matrices, folds it into the weights and runs
  HF's expert code on them (any experts implementation). Opt-in: it materialises the adapted expert weights
  every forward, and dropout does not apply to it.
The router, norms, embeddings and LM head stay frozen. `merged_state_dict` returns exactly the HF names and
shapes of the plain model with the adapters folded in: what weight sync sends, so engines never see adapters.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from glm_rl.checkpoint import load_safetensors, make_dirs, save_safetensors, write_file

LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = LINEAR_TARGETS + ("experts",)
DEFAULT_TARGETS = LINEAR_TARGETS
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


# -- math (shared with any other linear wrapper) --------------------------------------------------------------------
def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """s·B·A; a (..., r, in), b (..., out, r) -> (..., out, in)."""
    return scale * (b @ a)


def dora_gain(weight: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """m / ||V|| per output row; weight V (..., out, in), magnitude (..., out) -> (..., out)."""
    return magnitude / weight.norm(dim=-1)


def adapted_weight(weight, a, b, scale: float, magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """W' = W + s·B·A (LoRA), or m·V/||V|| with V = W + s·B·A (DoRA, when `magnitude` is given)."""
    v = weight + lora_delta(a, b, scale)
    return v if magnitude is None else v * dora_gain(v, magnitude).unsqueeze(-1)


def init_adapter(a: torch.Tensor, b: torch.Tensor, generator: torch.Generator) -> None:
    """A: Kaiming-uniform per matrix (as nn.Linear initialises an (r, in) weight); B: zeros."""
    bound = 1.0 / math.sqrt(a.shape[-1])  # kaiming_uniform_(a=sqrt(5)) on fan_in = in
    with torch.no_grad():
        a.uniform_(-bound, bound, generator=generator)
        b.zero_()


# -- modules -----------------------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """nn.Linear + a rank-r adapter; `base` keeps the frozen original (its weight and bias names)."""

    def __init__(
        self, base: nn.Linear, rank: int, alpha: float, dropout: float, dora: bool, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.base, self.scale = base.requires_grad_(False), alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, w.shape[1], dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.empty(w.shape[0], rank, dtype=w.dtype, device=w.device))
        init_adapter(self.lora_A, self.lora_B, generator)
        self.lora_magnitude = nn.Parameter(w.detach().norm(dim=-1)) if dora else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xd = self.dropout(x)
        lora = F.linear(F.linear(xd, self.lora_A), self.lora_B) * self.scale  # (..., out)
        if self.lora_magnitude is None:
            return self.base(x) + lora
        w = self.base.weight
        gain = dora_gain(w + lora_delta(self.lora_A, self.lora_B, self.scale), self.lora_magnitude)  # (out,)
        # g·(W·x_d + s·B·A·x_d) + bias, written as base(x) + (g-1)·W·x_d + g·s·B·A·x_d so that dropout only
        # touches the adapted part and a fresh adapter (g = 1, B = 0) returns base(x) bit for bit
        base = self.base(x)
        if xd is not x:
            wxd = F.linear(xd, w)
        else:  # no dropout: W·x is base(x) without its bias (saves a matmul)
            wxd = base if self.base.bias is None else base - self.base.bias
        return base + (gain - 1) * wxd + gain * lora

    def merged(self) -> dict[str, torch.Tensor]:
        """The base module's tensors (its own names) with the adapter folded into `weight`."""
        out = dict(self.base.state_dict())
        out["weight"] = adapted_weight(self.base.weight, self.lora_A, self.lora_B, self.scale, self.lora_magnitude)
        return out


class LoRAExperts(nn.Module):
    """HF's fused routed experts + one rank-r delta per expert on `gate_up_proj` and on `down_proj`."""

    PARAMS = ("gate_up_proj", "down_proj")

    def __init__(self, base: nn.Module, rank: int, alpha: float, dora: bool, generator: torch.Generator) -> None:
        super().__init__()
        self.base, self.scale = base.requires_grad_(False), alpha / rank
        for name in self.PARAMS:
            w = getattr(base, name)  # (E, out, in)
            a = nn.Parameter(torch.empty(w.shape[0], rank, w.shape[2], dtype=w.dtype, device=w.device))
            b = nn.Parameter(torch.empty(w.shape[0], w.shape[1], rank, dtype=w.dtype, device=w.device))
            init_adapter(a, b, generator)
            self.register_parameter(f"{name}_lora_A", a)
            self.register_parameter(f"{name}_lora_B", b)
            self.register_parameter(f"{name}_lora_magnitude", nn.Parameter(w.detach().norm(dim=-1)) if dora else None)

    def weights(self) -> dict[str, torch.Tensor]:
        return {
            name: adapted_weight(
                getattr(self.base, name),
                getattr(self, f"{name}_lora_A"),
                getattr(self, f"{name}_lora_B"),
                self.scale,
                getattr(self, f"{name}_lora_magnitude"),
            )
            for name in self.PARAMS
        }

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.base, self.weights(), args, kwargs)

    def merged(self) -> dict[str, torch.Tensor]:
        return {**self.base.state_dict(), **self.weights()}


ADAPTERS = (LoRALinear, LoRAExperts)


# -- model-level API ---------------------------------------------------------------------------------------------
def check_targets(targets: tuple[str, ...] | list[str]) -> None:
    """Raise naming the unknown module names and listing the valid ones."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        problem = f"unknown {unknown}" if unknown else "names no module"
        raise ValueError(f"--target-modules {','.join(targets)}: {problem}; valid: {','.join(TARGETS)}")


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets=DEFAULT_TARGETS,
    dora: bool = False,
    dropout: float = 0.0,
    seed: int = 0,
) -> list[str]:
    """Freeze `model` and wrap its target modules in place; returns the wrapped module names.

    A is drawn from a generator seeded with `seed`, so every data-parallel rank builds the same adapter."""
    check_targets(targets)
    if rank < 1:
        raise ValueError(f"--lora-rank must be >= 1 to apply adapters (got {rank})")
    if adapters(model):
        raise ValueError(f"{type(model).__name__} already has adapters; apply_lora once per model")
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    wrapped = []
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in targets:
            continue
        if isinstance(module, nn.Linear):
            new = LoRALinear(module, rank, alpha, dropout, dora, gen)
        elif leaf == "experts" and all(isinstance(getattr(module, p, None), nn.Parameter) for p in LoRAExperts.PARAMS):
            new = LoRAExperts(module, rank, alpha, dora, gen)
        else:
            raise TypeError(f"LoRA target {name} is a {type(module).__name__}, not nn.Linear or fused experts")
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, leaf, new)
        wrapped.append(name)
    if not wrapped:
        raise ValueError(f"--target-modules {','.join(targets)} matched no module of {type(model).__name__}")
    model.lora_config = {"rank": rank, "alpha": alpha, "targets": list(targets), "dora": dora}
    return wrapped


def adapters(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ADAPTERS)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (`*lora_A`, `*lora_B`, `*lora_magnitude`), by full module path."""
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n.rsplit(".", 1)[-1]}


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain HF state dict (same names, shapes, order as before `apply_lora`) with adapters merged in."""
    found = adapters(model)
    if not found:
        return dict(model.state_dict())
    merged = {f"{prefix}.{k}": v for prefix, m in found.items() for k, v in m.merged().items()}
    out = {}
    for key, value in model.state_dict().items():
        prefix = next((p for p in found if key.startswith(p + ".")), None)
        if prefix is None:
            out[key] = value
        elif key.startswith(prefix + ".base."):
            hf = prefix + "." + key[len(prefix) + len(".base.") :]
            out[hf] = merged[hf]
    return out


def save_adapter(model: nn.Module, path: Path) -> None:
    """Adapter-only checkpoint: adapter_model.safetensors + adapter_config.json (rank, alpha, targets, dora)."""
    make_dirs(path)
    save_safetensors(adapter_state_dict(model).items(), path / ADAPTER_WEIGHTS)
    write_file(path / ADAPTER_CONFIG, lambda f: f.write(json.dumps(model.lora_config, indent=2).encode()))


def load_adapter(model: nn.Module, path: Path) -> None:
    """Load an adapter saved by `save_adapter` into a model wrapped with the same settings (checked first)."""
    if not (path / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(
            f"{path}: no {ADAPTER_CONFIG} (not an adapter checkpoint; was it saved without --lora-rank?)"
        )
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    if config != model.lora_config:
        raise ValueError(
            f"{path / ADAPTER_CONFIG}: adapter was saved with {config}, this model has {model.lora_config}"
        )
    tensors = load_safetensors(path / ADAPTER_WEIGHTS)
    params = dict(model.named_parameters())
    own = set(adapter_state_dict(model))
    if set(tensors) != own:
        raise ValueError(
            f"{path / ADAPTER_WEIGHTS}: tensors differ from the model's adapters "
            f"(missing {sorted(own - set(tensors))[:3]}, unexpected {sorted(set(tensors) - own)[:3]})"
        )
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
