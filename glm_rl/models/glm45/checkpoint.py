"""Load HF GLM-4.5 checkpoints and check them against a preset.

GLM-4.5 checkpoints store the MTP layer as `model.layers.{num_hidden_layers}.*`. HF's `Glm4MoeForCausalLM`
does not build it (only its 355B / Air indices are on HF's ignore list), so `load_hf_model` silences exactly
that layer's keys, and `load_mtp` builds HF's own `MtpModel` from them.

FP8 checkpoints (config.json `quantization_config`, block-wise e4m3 as written by tools/convert_hf_to_fp8.py)
load on this CPU reference path by dequantizing into the requested dtype (`models/fp8.py`); SGLang runs them
natively. The dequantized weights go to a temporary unquantized copy of the checkpoint that HF then loads like
any other (per-expert weights fused, MTP keys skipped), and that `load_mtp` re-reads; it is removed with the model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from transformers import AutoTokenizer, Glm4MoeForCausalLM
from transformers.modeling_layers import MtpModel

from glm_rl.models.fp8 import Fp8Error, checkpoint_block_size, dequantize_checkpoint
from glm_rl.models.glm45.presets import ModelSpec, get_preset


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or contradicts the chosen preset."""


def read_spec(path: str | Path) -> ModelSpec:
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path}: no config.json (expected an HF checkpoint directory)")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "glm4_moe":
        raise CheckpointError(f"{config_path}: model_type is {config.get('model_type')!r}, expected 'glm4_moe'")
    return ModelSpec.from_hf_config(config, name=Path(path).name)


def check_matches_preset(path: str | Path, preset: str) -> ModelSpec:
    """The checkpoint's spec; raises naming every field where it contradicts `preset` (both values)."""
    expected, found = get_preset(preset), read_spec(path)
    differences = expected.diff(found)
    if differences:
        lines = ", ".join(f"{k}: preset {a!r} vs checkpoint {b!r}" for k, (a, b) in differences.items())
        raise CheckpointError(f"{path}/config.json contradicts preset {preset!r}: {lines}")
    return found


def _model_class(num_hidden_layers: int) -> type[Glm4MoeForCausalLM]:
    """Glm4MoeForCausalLM that expects (and ignores) the MTP layer's keys at this checkpoint's layer index. It
    keeps transformers' module name: transformers decides from the class's module source whether a model may
    choose its experts kernel, and a class of another module silently gets the eager per-expert loop."""
    pattern = rf"model\.layers\.{num_hidden_layers}\..*"
    return type(
        "Glm4MoeForCausalLM",
        (Glm4MoeForCausalLM,),
        {"_keys_to_ignore_on_load_unexpected": [pattern], "__module__": Glm4MoeForCausalLM.__module__},
    )


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32, preset: str | None = None):
    """(model, tokenizer) from an HF checkpoint dir, in eval mode; optionally checked against a preset first.
    Experts run transformers' grouped GEMM in bf16 (one kernel per projection, no host synchronisation, so CUDA
    graphs can capture it) and the per-expert loop otherwise (torch's grouped GEMM has no fast path there)."""
    spec = check_matches_preset(path, preset) if preset else read_spec(path)
    source = _dequantized_copy(path, dtype)  # None unless the checkpoint is FP8
    experts = "grouped_mm" if dtype == torch.bfloat16 else "eager"
    model = _model_class(spec.num_hidden_layers).from_pretrained(
        str(source or path), dtype=dtype, experts_implementation=experts
    )
    if source is not None:
        weakref.finalize(model, shutil.rmtree, source, ignore_errors=True)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def _dequantized_copy(path: str | Path, dtype: torch.dtype) -> Path | None:
    """For an FP8 checkpoint, a temporary unquantized copy in `dtype`; None for any other checkpoint."""
    config = json.loads((Path(path) / "config.json").read_text())
    try:
        if checkpoint_block_size(config, f"{path}/config.json") is None:
            return None
    except Fp8Error as e:
        raise CheckpointError(str(e)) from None
    tmp = Path(tempfile.mkdtemp(prefix="glm_rl_fp8_"))
    try:
        return dequantize_checkpoint(path, tmp, dtype)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{path}: cannot dequantize the FP8 checkpoint: {e}") from e


def load_mtp(model) -> MtpModel:
    """HF's MTP module for `model`, loaded from the checkpoint it came from (raises if weights are missing)."""
    mtp = MtpModel.from_pretrained(model)
    mtp.eval()
    return mtp


def save_hf_checkpoint(model, mtp, tokenizer, out_dir: Path) -> None:
    """Write the HF checkpoint with the MTP layer as `model.layers.{N}.*`, as GLM-4.5 checkpoints do.

    HF's own serialisation writes the per-expert names: the MTP decoder layer is saved as layer N of an
    (N+1)-layer copy of the model, then the MTP-only tensors (enorm, hnorm, eh_proj, shared_head) are added.
    """
    from safetensors.torch import load_file, save_file

    cfg = model.config
    n = cfg.num_hidden_layers
    with tempfile.TemporaryDirectory() as tmp:
        big_cfg = type(cfg).from_dict({**cfg.to_dict(), "num_hidden_layers": n + 1})
        big = Glm4MoeForCausalLM(big_cfg).to(model.dtype)  # on the host: the model may sit on a GPU
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        for k, v in mtp.layers[0].mtp_block.state_dict().items():
            state[f"model.layers.{n}.{k}"] = v.cpu()
        big.load_state_dict(state, strict=True)
        big.save_pretrained(tmp)
        tensors = {k: v for f in sorted(Path(tmp).glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    layer = mtp.layers[0]
    prefix = f"model.layers.{n}."
    tensors[prefix + "enorm.weight"] = layer.enorm.weight.detach().cpu().clone()
    tensors[prefix + "hnorm.weight"] = layer.hnorm.weight.detach().cpu().clone()
    tensors[prefix + "eh_proj.weight"] = layer.eh_proj.weight.detach().cpu().clone()
    tensors[prefix + "shared_head.norm.weight"] = layer.post_norm.weight.detach().cpu().clone()
    tensors[prefix + "embed_tokens.weight"] = model.model.embed_tokens.weight.detach().cpu().clone()
    tensors[prefix + "shared_head.head.weight"] = model.lm_head.weight.detach().cpu().clone()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in sorted(tensors.items())},
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    cfg.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
