"""Train a checkpoint's MTP (drafter) layer on the main model's own greedy outputs; write the checkpoint back.

    python tools/train_mtp_drafter.py --hf-checkpoint CKPT --prompt-data train.jsonl --out CKPT-drafted
    python tools/train_mtp_drafter.py --hf-checkpoint CKPT --prompt-data train.jsonl --out OUT --reinit-drafter

Use it when the MTP layer drafts badly — a random one, or one left behind after RL moved the main model — so
that `--enable-mtp` speculative decoding accepts more (`glm_rl/models/glm45/mtp_distill.py` says how it
trains). The main model's tensors are written back unchanged; only `model.layers.{num_hidden_layers}.*` is
new. Prompts: `--input-key` of each row (text or chat messages) of the same files `glm-rl train --prompt-data`
reads (JSONL, Parquet, a `datasets` directory), through the checkpoint's chat template.
The first `--held-out` prompts are kept out of training and give the acceptance reported before and after
(the share of positions where the drafter's argmax is the main model's), also written to `<out>/drafter.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from glm_rl.evaluate import chat_prompt_ids  # noqa: E402
from glm_rl.models.glm45.checkpoint import load_hf_model, load_mtp, save_hf_checkpoint  # noqa: E402
from glm_rl.models.glm45.mtp_distill import distill, greedy_batches  # noqa: E402
from glm_rl.rollout.data import DataError, load_prompts  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def read_prompts(path: Path, key: str, limit: int) -> list:
    """The first `limit` rows' prompts (text or chat messages), read and checked by the RL loop's own loader
    (JSONL, Parquet or a `datasets` directory; bad rows named file:line) before any model is loaded. The drafter
    needs no label: the prompt field stands in for it."""
    try:
        return [row.prompt for row in load_prompts(path, prompt_key=key, label_key=key)[:limit]]
    except DataError as e:
        sys.exit(str(e))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-checkpoint", type=Path, required=True)
    ap.add_argument("--prompt-data", type=Path, required=True, help="prompts, as glm-rl train reads them")
    ap.add_argument("--input-key", default="prompt")
    ap.add_argument("--out", type=Path, required=True, help="where the checkpoint with the new drafter goes")
    ap.add_argument("--prompts", type=int, default=512, help="prompts to generate from (held-out ones included)")
    ap.add_argument("--held-out", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128, help="greedy tokens generated per prompt")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--reinit-drafter", action="store_true", help="start from a freshly initialised MTP layer")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16" if torch.cuda.is_available() else "float32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not 0 < args.held_out < args.prompts:
        ap.error(f"--held-out {args.held_out} must lie in (0, --prompts {args.prompts})")
    if args.out.resolve() == args.hf_checkpoint.resolve():
        ap.error("--out must differ from --hf-checkpoint (the original is kept)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    texts = read_prompts(args.prompt_data, args.input_key, args.prompts)
    n_held = -(-args.held_out // args.batch_size)  # whole batches: the first prompts
    if len(texts) <= n_held * args.batch_size:
        sys.exit(
            f"--prompt-data {args.prompt_data}: {len(texts)} prompts; training needs more than the held-out "
            f"{n_held * args.batch_size} (--held-out {args.held_out} in whole --batch-size {args.batch_size} batches)"
        )
    torch.manual_seed(args.seed)
    model, tokenizer = load_hf_model(args.hf_checkpoint, DTYPES[args.dtype])
    model.to(args.device)
    mtp = load_mtp(model).to(args.device)
    if args.reinit_drafter:
        for module in mtp.layers.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    prompts = [chat_prompt_ids(tokenizer, t) for t in texts]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    print(f"generating {len(prompts)} greedy continuations of <= {args.new_tokens} tokens", flush=True)
    batches = greedy_batches(
        model, prompts, new_tokens=args.new_tokens, eos_ids=eos, pad_id=pad, batch_size=args.batch_size
    )
    result = distill(model, mtp, batches[n_held:], batches[:n_held], steps=args.steps, lr=args.lr)
    print(f"acceptance on held-out prompts: {result['acceptance_before']:.3f} -> {result['acceptance_after']:.3f}")
    save_hf_checkpoint(model, mtp, tokenizer, args.out)
    (args.out / "drafter.json").write_text(json.dumps(result | {"source": args.hf_checkpoint.name}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
