"""Convert an HF GLM-4.5 checkpoint to block-wise FP8 (e4m3), the format SGLang serves natively.

    python tools/convert_hf_to_fp8.py --hf-checkpoint DIR --save DIR [--block-size 128]

What it writes into --save (format and error bound: `glm_rl/models/fp8.py`):
- the same safetensors shards (and index), in which every linear weight of attention and of the dense /
  shared / routed-expert MLPs (the MTP layer's too) is float8_e4m3fn, followed in the same shard by its
  `<name>_scale_inv` (fp32, ceil(out/B) x ceil(in/B) per-block scales; W ~= fp8 * scale);
- everything else unchanged, in its original dtype (bf16 for released GLM-4.5 checkpoints, fp32 for the
  shipped tiny one): norms, router weight and `e_score_correction_bias`, embeddings, LM head, MTP `eh_proj`
  and `shared_head`;
- config.json with `quantization_config` {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme":
  "dynamic", "weight_block_size": [B, B], "modules_to_not_convert": [...]} — the keys SGLang's Fp8Config reads
  (`modules_to_not_convert` names the unquantized 2-D modules, so an engine never tries to quantize them);
- every other file of the directory (tokenizer, chat template, generation config) copied.

Bad input (missing directory, not a glm4_moe config, already quantized, no safetensors, --save not empty or the
source itself) fails with one line before anything is written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from glm_rl.models.fp8 import (
    Fp8Error,
    is_quantizable,
    parts_of,
    quantization_config,  # noqa: E402
    quantize_blockwise,
    scale_name,
    weight_files,
)
from glm_rl.models.glm45.checkpoint import CheckpointError, read_spec  # noqa: E402

WEIGHT_INDEX = "model.safetensors.index.json"


class ConversionError(ValueError):
    """Input the converter refuses, named in one line."""


def check_inputs(src: Path, dst: Path, block_size: int) -> dict[str, str]:
    """Validate everything before writing; returns {tensor name: shard file}."""
    if not src.is_dir():
        raise ConversionError(f"--hf-checkpoint {src}: not a directory")
    try:
        read_spec(src)  # config.json present, model_type glm4_moe
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" in config:
        raise ConversionError(
            f"{src}/config.json already has a quantization_config "
            f"({config['quantization_config'].get('quant_method')!r}): nothing to convert"
        )
    if block_size < 1:
        raise ConversionError(f"--block-size must be >= 1, got {block_size}")
    if dst.resolve() == src.resolve():
        raise ConversionError(f"--save {dst} is the source checkpoint: write the FP8 copy elsewhere")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConversionError(f"--save {dst} exists and is not an empty directory")
    try:
        return weight_files(src)
    except Fp8Error as e:
        raise ConversionError(str(e)) from None


def convert(src: str | Path, dst: str | Path, block_size: int = 128, progress: bool = True) -> dict:
    """Write the FP8 checkpoint; returns a summary (tensor counts, bytes before / after)."""
    src, dst = Path(src), Path(dst)
    where = check_inputs(src, dst, block_size)
    dst.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    kept: list[str] = []
    summary = {"quantized": 0, "kept": 0, "bytes_in": 0, "bytes_out": 0}
    bar = tqdm(total=len(where), desc="fp8", unit="tensor", disable=not progress)
    for file in sorted(set(where.values())):
        out = {}
        with safe_open(src / file, framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                summary["bytes_in"] += t.numel() * t.element_size()
                if is_quantizable(name, t):
                    q, s = quantize_blockwise(t, block_size, parts_of(name))
                    out[name], out[scale_name(name)] = q, s
                    summary["quantized"] += 1
                else:
                    out[name] = t
                    summary["kept"] += 1
                    if t.ndim >= 2 and name.endswith(".weight"):
                        kept.append(name.removesuffix(".weight"))
                bar.update(1)
        summary["bytes_out"] += sum(t.numel() * t.element_size() for t in out.values())
        save_file(out, str(dst / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in out})
    bar.close()
    if (src / WEIGHT_INDEX).is_file():
        index = json.loads((src / WEIGHT_INDEX).read_text())
        index["weight_map"] = weight_map
        index.setdefault("metadata", {})["total_size"] = summary["bytes_out"]
        (dst / WEIGHT_INDEX).write_text(json.dumps(index, indent=2))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config(block_size, sorted(kept))
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name not in ("config.json", WEIGHT_INDEX):
            shutil.copy2(p, dst / p.name)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-checkpoint", required=True, type=Path, help="HF GLM-4.5 checkpoint directory")
    p.add_argument("--save", required=True, type=Path, help="output directory (must not exist or be empty)")
    p.add_argument("--block-size", type=int, default=128, help="square block edge (SGLang expects 128)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        s = convert(a.hf_checkpoint, a.save, a.block_size, progress=not a.no_progress)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {a.save}: {s['quantized']} weights in FP8, {s['kept']} tensors kept; "
        f"{s['bytes_in'] / 2**20:.1f} MiB -> {s['bytes_out'] / 2**20:.1f} MiB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
