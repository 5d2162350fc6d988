"""Tiny tool-use demo (issue 18 item 6): multiplication prompts `a*b` and a `calculator` tool.

The tiny checkpoint's character tokenizer has no letters and no tags, so the demo checkpoint is the tiny one
with 24 more vocabulary rows (48 in all): GLM-4.5's tags (`<think>`, `<tool_call>`, `<arg_key>`,
`<arg_value>`, `<tool_response>`, `<tools>` and their closers) and the words `calculator` / `expression`, each
one token. The new embedding rows start at the mean of the old ones and the new output rows at zero; the
weights are otherwise the tiny model's, which never learned to call a tool (teaching it to by supervised
training is not done here), so RL starts from rare, random calls.

    python -m glm_rl.rollout.agentic.demo outputs/tool-demo          # checkpoint/ and train.jsonl
    glm-rl train --hf-checkpoint outputs/tool-demo/checkpoint --prompt-data outputs/tool-demo/train.jsonl \\
        --custom-generate-function-path glm_rl.rollout.agentic.tool_loop.generate \\
        --tools-path glm_rl.rollout.agentic.demo.TOOLS --max-turns 2 --rollout-max-context-len 120 \\
        --rollout-max-response-len 24

(The last command needs the hook and agentic flags registered in the config parser and the manager.)
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from glm_rl.models.glm45.presets import TINY_CHECKPOINT
from glm_rl.rollout.agentic.tools import CALCULATOR

TOOLS = [CALCULATOR]
NEW_TOKENS = [
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "<tool_response>",
    "</tool_response>",
    "<tools>",
    "</tools>",
    "calculator",
    "expression",
]
VOCAB = 48


def make_checkpoint(out: Path, source: Path = TINY_CHECKPOINT) -> Path:
    """The tiny checkpoint with the demo's tokens (see the module docstring); returns `out`."""
    from tokenizers import Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        shutil.copy(source / name, out / name)
    tok = Tokenizer.from_file(str(source / "tokenizer.json"))
    tok.add_tokens(NEW_TOKENS)
    if tok.get_vocab_size() > VOCAB:
        raise ValueError(f"{tok.get_vocab_size()} tokens do not fit the demo vocabulary of {VOCAB}")
    tok.save(str(out / "tokenizer.json"))
    config = json.loads((source / "config.json").read_text())
    old = config["vocab_size"]
    config["vocab_size"] = VOCAB
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = load_file(str(source / "model.safetensors"))
    for name, t in tensors.items():
        if t.dim() == 2 and t.shape[0] == old:
            fill = t.mean(0, keepdim=True) if "embed_tokens" in name else torch.zeros_like(t[:1])
            tensors[name] = torch.cat([t, fill.expand(VOCAB - old, -1)]).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def make_data(path: Path, n: int = 512, seed: int = 0) -> Path:
    """`a*b` prompts (a, b in 2..99) with the product as label, declaring the calculator tool."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            f.write(json.dumps({"prompt": f"{a}*{b}", "label": str(a * b), "tools": [CALCULATOR.schema()]}) + "\n")
    return path


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/tool-demo")
    print(make_checkpoint(root / "checkpoint"), make_data(root / "train.jsonl"))
