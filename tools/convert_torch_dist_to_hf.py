"""Convert a Megatron torch_dist checkpoint (written by tools/convert_hf_to_torch_dist.py or by training)
back into an HF GLM-4.5 checkpoint.

    python tools/convert_torch_dist_to_hf.py --load DIR --hf-checkpoint TEMPLATE_DIR --save DIR

TEMPLATE_DIR is an HF checkpoint of the same architecture (checked field by field): its config, tokenizer and
chat template are copied, and its safetensors file layout and per-tensor dtypes are reproduced. Runs on one
process, whatever layout wrote the checkpoint. Logic and checks: `glm_rl/convert.py`; `glm-rl convert export`
is the same job.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Before torch / megatron are imported (so also under torchrun): TorchDynamo off — megatron's fused kernels
# go through torch.compile, ~17 s cold on CPU for nothing a conversion needs — and CUDA hidden: conversions
# run on CPU/gloo on every host (glm_rl/convert.py, RANK_ENV).
os.environ.update({"TORCHDYNAMO_DISABLE": "1", "CUDA_VISIBLE_DEVICES": ""})
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", type=Path, required=True, help="torch_dist checkpoint directory")
    p.add_argument("--hf-checkpoint", type=Path, required=True, help="HF checkpoint used as the template")
    p.add_argument("--save", type=Path, required=True, help="HF output directory (new or empty)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from glm_rl.convert import check_export, export_checkpoint

    args = parse(argv)
    try:
        job = check_export(args.load, args.hf_checkpoint, args.save, progress=args.progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    export_checkpoint(job, in_process=True)  # this process exists for the job
    print(f"wrote HF checkpoint {job.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
