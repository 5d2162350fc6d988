"""Convert an HF GLM-4.5 checkpoint into a Megatron torch_dist checkpoint (loadable at any parallel layout).

    python tools/convert_hf_to_torch_dist.py --hf-checkpoint DIR --save DIR [--model-preset NAME]
        [--tensor-model-parallel-size N --pipeline-model-parallel-size N --context-parallel-size N
         --expert-model-parallel-size N --expert-tensor-parallel-size N
         --decoder-first-pipeline-num-layers N --decoder-last-pipeline-num-layers N]

Under `torchrun --nproc-per-node W` each process is one rank (RANK / WORLD_SIZE); run plainly, it spawns the
fewest ranks that hold the layout on this host. The layout only decides how the writing is split: the
checkpoint loads at any other layout. Logic and checks: `glm_rl/convert.py`; `glm-rl convert import` is the
same job.
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

LAYOUT_FLAGS = {
    "tp": "--tensor-model-parallel-size",
    "pp": "--pipeline-model-parallel-size",
    "cp": "--context-parallel-size",
    "ep": "--expert-model-parallel-size",
    "etp": "--expert-tensor-parallel-size",
    "decoder_first_pipeline_num_layers": "--decoder-first-pipeline-num-layers",
    "decoder_last_pipeline_num_layers": "--decoder-last-pipeline-num-layers",
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-checkpoint", type=Path, required=True, help="HF GLM-4.5 checkpoint directory")
    p.add_argument("--save", type=Path, required=True, help="torch_dist output directory (new or empty)")
    p.add_argument("--model-preset", default=None, help="check the HF config against this preset first")
    for dest, flag in LAYOUT_FLAGS.items():
        p.add_argument(flag, dest=dest, type=int, default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from glm_rl.convert import check_import, import_checkpoint

    args = parse(argv)
    try:
        job = check_import(
            args.hf_checkpoint,
            args.save,
            model_preset=args.model_preset,
            progress=args.progress,
            **{k: getattr(args, k) for k in LAYOUT_FLAGS},
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import_checkpoint(job, in_process=True)  # this process exists for the job
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"wrote torch_dist checkpoint {job.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
