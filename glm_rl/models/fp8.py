"""Block-wise FP8 (e4m3) weights in the DeepSeek-V3 / SGLang convention, shared by the checkpoint converter
(`tools/convert_hf_to_fp8.py`), the checkpoint loader (FP8 checkpoints on the CPU reference path) and the
`--rollout-fp8` weight sync.

Format: a 2-D weight W (out, in) is cut into blocks of 128 x 128 (the last row / column of blocks may be
partial); each block b gets s_b = amax(|W_b|) / 448 (448 = largest finite e4m3fn value) and stores
q = fp8_e4m3fn(W_b / s_b), rounded to nearest. `weight_scale_inv` (fp32, ceil(out/128) x ceil(in/128)) holds
the s_b: despite its name it MULTIPLIES on dequantization, W ~= q * s (DeepSeek-V3 and SGLang read it so).
An all-zero block gets s = 1 (any scale represents it exactly; 0 would divide by zero).
Leading dimensions are batch dimensions: HF's fused expert stacks (E, out, in) quantize per expert.

Which tensors: the linear weights of attention (q/k/v/o) and of the dense, shared-expert and routed-expert
MLPs, in checkpoint names (`...experts.3.gate_proj.weight`) and in HF's fused in-memory names
(`...experts.gate_up_proj`, `...experts.down_proj`). The fused `gate_up_proj` (E, 2I, H) is quantized as its
gate and up halves separately (`parts=2`), so its blocks are exactly those of the checkpoint's per-expert
gate_proj / up_proj: an engine loaded from a converted checkpoint and one that received `--rollout-fp8` weights
hold bitwise the same tensors. Norms, router (`mlp.gate`, its `e_score_correction_bias`), embeddings, LM head
and the MTP layer's `eh_proj` / `shared_head` stay in their original dtype (what SGLang also runs unquantized).

Error bound (used by the tests): e4m3fn has 3 mantissa bits, so rounding a normal value (|x| >= 2^-6 after
scaling) errs by at most half an ulp, 2^-4 |x|; below 2^-6 the subnormal spacing is 2^-9, so the error is at
most 2^-10 in scaled units. Hence |W - q*s| <= max(2^-4 |W|, 2^-10 s) per element (plus fp32 rounding).

On GPU SGLang runs these weights natively (W8A8 block FP8 GEMMs); here `dequantize_blockwise` is the CPU
reference path: weights are rounded to FP8 and computed in the model dtype, activations are not quantized.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
BLOCK = 128
SCALE_SUFFIX = "_scale_inv"  # "x.weight" -> "x.weight_scale_inv"

Named = list[tuple[str, torch.Tensor]]

_QUANTIZED = re.compile(
    r"\.(self_attn\.[qkvo]_proj\.weight"
    r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate|up|down)_proj\.weight"
    r"|mlp\.experts\.(gate_up|down)_proj)$"
)


class Fp8Error(ValueError):
    """An FP8 tensor, scale or checkpoint that cannot be used (missing scale, wrong shape, bad config)."""


def quantization_config(block_size: int = BLOCK, modules_to_not_convert: list[str] | None = None) -> dict:
    """The config.json `quantization_config` SGLang's Fp8Config reads for DeepSeek / GLM block-FP8 checkpoints."""
    config = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [block_size, block_size],
    }
    if modules_to_not_convert is not None:
        config["modules_to_not_convert"] = modules_to_not_convert
    return config


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


def is_quantizable(name: str, tensor: torch.Tensor) -> bool:
    """A linear weight we store in FP8 (see the module docstring for which)."""
    return (
        _QUANTIZED.search(name) is not None
        and tensor.ndim >= 2
        and tensor.is_floating_point()
        and tensor.dtype != FP8_DTYPE
    )


def parts_of(name: str) -> int:
    """2 for HF's fused experts `gate_up_proj` (gate and up halves quantized apart), else 1."""
    return 2 if name.endswith("experts.gate_up_proj") else 1


def scale_shape(shape: Iterable[int], block: int = BLOCK, parts: int = 1) -> tuple[int, ...]:
    *lead, rows, cols = shape
    return (*lead, parts * math.ceil(rows // parts / block), math.ceil(cols / block))


def quantize_blockwise(w: torch.Tensor, block: int = BLOCK, parts: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s): q float8_e4m3fn with w's shape, s fp32 of `scale_shape`; w ~= dequantize_blockwise(q, s)."""
    if w.ndim < 2:
        raise Fp8Error(f"quantize_blockwise needs a >= 2-D tensor, got shape {tuple(w.shape)}")
    if parts > 1:
        if w.shape[-2] % parts:
            raise Fp8Error(f"cannot split {w.shape[-2]} rows into {parts} equal parts")
        halves = [quantize_blockwise(c, block) for c in w.chunk(parts, dim=-2)]
        return torch.cat([q for q, _ in halves], dim=-2), torch.cat([s for _, s in halves], dim=-2)
    *lead, rows, cols = w.shape
    nr, nc = math.ceil(rows / block), math.ceil(cols / block)
    x = F.pad(w.detach().float(), (0, nc * block - cols, 0, nr * block - rows))  # zeros leave amax unchanged
    blocks = x.reshape(*lead, nr, block, nc, block)
    amax = blocks.abs().amax(dim=(-3, -1))  # (..., nr, nc)
    if not torch.isfinite(amax).all():
        raise Fp8Error(f"cannot quantize a tensor with inf / nan values (shape {tuple(w.shape)})")
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.reshape(*lead, nr * block, nc * block)[..., :rows, :cols].contiguous(), scale


def dequantize_blockwise(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, block: int = BLOCK, parts: int = 1
) -> torch.Tensor:
    """q * s per block (computed in fp32), cast to `dtype`."""
    if tuple(scale.shape) != scale_shape(q.shape, block, parts):
        raise Fp8Error(
            f"scale shape {tuple(scale.shape)} does not fit a weight of shape {tuple(q.shape)} "
            f"(expected {scale_shape(q.shape, block, parts)} for {block}x{block} blocks)"
        )
    if parts > 1:
        return torch.cat(
            [
                dequantize_blockwise(a, b, dtype, block)
                for a, b in zip(q.chunk(parts, dim=-2), scale.chunk(parts, dim=-2))
            ],
            dim=-2,
        )
    rows, cols = q.shape[-2:]
    s = scale.float().repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :rows, :cols]
    return (q.float() * s).to(dtype)


def quantize_named(named: Iterable[tuple[str, torch.Tensor]], block: int = BLOCK) -> Named:
    """Each quantizable (name, w) becomes (name, q), (name + '_scale_inv', s); the rest pass unchanged."""
    out: Named = []
    for name, tensor in named:
        if is_quantizable(name, tensor):
            q, s = quantize_blockwise(tensor, block, parts_of(name))
            out += [(name, q), (scale_name(name), s)]
        else:
            out.append((name, tensor))
    return out


def dequantize_named(
    named: Iterable[tuple[str, torch.Tensor]], dtype_of: Callable[[str], torch.dtype], block: int = BLOCK
) -> Named:
    """Inverse of `quantize_named`: every float8 tensor is dequantized with its scale into `dtype_of(name)`;
    raises Fp8Error for a float8 tensor without its scale or a scale without its float8 tensor."""
    named = list(named)
    fp8 = {n for n, t in named if t.dtype == FP8_DTYPE}
    scales = {n: t for n, t in named if n.endswith(SCALE_SUFFIX) and n.removesuffix(SCALE_SUFFIX) in fp8}
    orphans = [n for n, _ in named if n.endswith(SCALE_SUFFIX) and n not in scales]
    missing = [n for n in fp8 if scale_name(n) not in scales]
    if orphans or missing:
        problems = ([f"float8 tensors without a scale: {missing}"] if missing else []) + (
            [f"scales without a float8 tensor: {orphans}"] if orphans else []
        )
        raise Fp8Error("FP8 weights and their scales must travel together; " + "; ".join(problems))
    try:
        return [
            (n, dequantize_blockwise(t, scales[scale_name(n)], dtype_of(n), block, parts_of(n)) if n in fp8 else t)
            for n, t in named
            if n not in scales
        ]
    except Fp8Error as e:
        raise Fp8Error(f"dequantizing: {e}") from None


def gloo_view(t: torch.Tensor) -> torch.Tensor:
    """float8 tensors as their raw bytes (uint8, same shape): gloo has no float8 type. Others unchanged."""
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t


# -- checkpoints ------------------------------------------------------------------------------------------
def checkpoint_block_size(config: dict, where: str = "config.json") -> int | None:
    """None for an unquantized config; the block size of a block-FP8 one; Fp8Error for anything else."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    block = qc.get("weight_block_size")
    if (
        qc.get("quant_method") != "fp8"
        or qc.get("fmt", "e4m3") != "e4m3"
        or not (isinstance(block, list) and len(block) == 2 and block[0] == block[1] and block[0] > 0)
    ):
        raise Fp8Error(
            f"{where}: unsupported quantization_config {qc} (this loader reads block-wise FP8 e4m3 "
            "with square blocks, as written by tools/convert_hf_to_fp8.py)"
        )
    return int(block[0])


def weight_files(path: Path) -> dict[str, str]:
    """{tensor name: safetensors file name} of an HF checkpoint directory (sharded or single-file)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise Fp8Error(f"{path}: no *.safetensors weights")
    out: dict[str, str] = {}
    for file in files:
        with safe_open(path / file, framework="pt") as f:
            out.update({k: file for k in f.keys()})
    return out


def dequantize_checkpoint(src: str | Path, dst: str | Path, dtype: torch.dtype) -> Path:
    """Write an unquantized copy of the FP8 checkpoint `src` into `dst` (float8 weights dequantized into
    `dtype`, scales dropped, shards kept, config without quantization_config, other files copied)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    block = checkpoint_block_size(config, str(src / "config.json"))
    if block is None:
        raise Fp8Error(f"{src}: not an FP8 checkpoint (no quantization_config)")
    dst.mkdir(parents=True, exist_ok=True)
    where = weight_files(src)
    handles = {file: safe_open(src / file, framework="pt") for file in sorted(set(where.values()))}
    kept: dict[str, str] = {}
    for file, handle in handles.items():
        tensors = {}
        for name in handle.keys():
            if name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) in where:
                continue
            t = handle.get_tensor(name)
            if t.dtype == FP8_DTYPE:
                if scale_name(name) not in where:
                    raise Fp8Error(f"{src}: float8 tensor {name} has no {scale_name(name)}")
                scale = handles[where[scale_name(name)]].get_tensor(scale_name(name))
                t = dequantize_blockwise(t, scale, dtype, block, parts_of(name))
            tensors[name] = t
            kept[name] = file
        save_file(tensors, str(dst / file), metadata={"format": "pt"})
    if (src / "model.safetensors.index.json").is_file():
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": kept}, indent=2))
    config.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for p in src.iterdir():
        if (
            p.is_file()
            and not p.name.endswith(".safetensors")
            and p.name not in ("config.json", "model.safetensors.index.json")
        ):
            shutil.copy2(p, dst / p.name)
    return dst
