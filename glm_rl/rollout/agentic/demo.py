"""Tiny tool-use demo (issue 18 item 6): multiplication prompts `a*b` and a `calculator` tool.

The tiny checkpoint's character tokenizer has no letters and no tags, so the demo checkpoint is the tiny one
with 24 more vocabulary rows (48 in all): GLM-4.5's tags (`<think>`, `<tool_call>`, `<arg_key>`,
`<arg_value>`, `<tool_response>`, `<tools>` and their closers) and the words `calculator` / `expression`, each
one token. The new embedding rows start at the mean of the old ones and the new output rows at zero.

The tiny model cannot multiply two-digit numbers and never wrote a tool call, so `warm_start` then teaches it,
by a short seeded supervised run on CPU, a mix of two behaviours: `a*b=?` followed by a `calculator` call in
GLM-4.5's format and, after the observation, `a*b=<result>`; or a direct, wrong guess `a*b=<g>`. At temperature
1 it calls the tool in a minority of episodes (about 5-15 %), and nearly all its guesses are wrong, so RL has
something to find: calls earn reward 1, guesses 0.

    python tools/make_tool_demo.py build outputs/tool-demo              # checkpoint/ and train.jsonl
    glm-rl train --hf-checkpoint outputs/tool-demo/checkpoint --prompt-data outputs/tool-demo/train.jsonl \\
        --custom-generate-function-path glm_rl.rollout.agentic.tool_loop.generate \\
        --tools-path glm_rl.rollout.agentic.demo.TOOLS --max-turns 2 --rollout-max-context-len 100 \\
        --rollout-max-response-len 32 --rollout-batch-size 8 --n-samples-per-prompt 8 --num-rollout 40 \\
        --lr 3e-4 --output-dir outputs/tool-demo/run \\
        --save-debug-rollout-data 'outputs/tool-demo/run/dumps/rollout_{rollout_id}.pt'
    python tools/make_tool_demo.py report outputs/tool-demo/run          # reward and correct-call share
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from dataclasses import dataclass
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


@dataclass(frozen=True, kw_only=True)
class WarmStart:
    """The supervised warm-start: `steps` of Adam on batches of `batch` episodes (see `warm_start`)."""

    steps: int = 150
    batch: int = 32
    lr: float = 3e-3
    tool_rows: float = 0.5  # episodes that call the calculator (they teach the format); the rest guess wrong
    tool_share: float = 0.2  # the probability of a call that the decision token learns
    seed: int = 0

    @property
    def decision_keep(self) -> float:
        """The share of calling episodes whose decision token (`?` after `a*b=`) is trained, so that the calls
        are `tool_share` of the trained decisions: t·q / (t·q + 1 - t) = s."""
        t, s = self.tool_rows, self.tool_share
        return s * (1 - t) / (t * (1 - s))


def make_checkpoint(out: Path, source: Path = TINY_CHECKPOINT, warm: WarmStart | None = WarmStart()) -> Path:
    """The tiny checkpoint with the demo's tokens, then `warm_start` unless `warm` is None; returns `out`."""
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
    if warm is not None:
        warm_start(out, warm)
    return out


def episode(rng: random.Random, tool: bool) -> list[dict]:
    """One `a*b` conversation: `a*b=?` with a calculator call, its result and `a*b=<result>`; or a wrong guess
    `a*b=<g>`. (The calling turn has content: the tiny tokenizer reads the template's `\n\n` after an empty one
    as one unknown token.)"""
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    q, p = f"{a}*{b}", a * b
    if tool:
        call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": q}}}
        return [
            {"role": "user", "content": q},
            {"role": "assistant", "content": f"{q}=?", "tool_calls": [call]},
            {"role": "tool", "content": str(p)},
            {"role": "assistant", "content": f"{q}={p}"},
        ]
    digits, guess = len(str(p)), p
    while guess == p:  # a number of the product's length, never the product
        guess = rng.randint(10 ** (digits - 1), 10**digits - 1)
    return [{"role": "user", "content": q}, {"role": "assistant", "content": f"{q}={guess}"}]


def _ids_and_labels(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """The rendered conversation and its labels: the assistant turns' ids, -100 elsewhere."""
    schemas = [t.schema() for t in TOOLS]

    def render(k: int, gen: bool) -> list[int]:
        return tok.apply_chat_template(
            messages[:k], tools=schemas, add_generation_prompt=gen, tokenize=True, return_dict=False
        )

    ids, labels = render(len(messages), False), []
    labels = [-100] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            head, turn = render(k, True), render(k + 1, False)
            if ids[: len(turn)] != turn or turn[: len(head)] != head:
                raise ValueError(f"the chat template does not render {messages} prefix by prefix")
            labels[len(head) : len(turn)] = ids[len(head) : len(turn)]
    return ids, labels


def warm_start(ckpt: Path, cfg: WarmStart) -> float:
    """Teach the checkpoint GLM-4.5's calculator call on a seeded mix of calling and guessing episodes.

    Only the assistant turns are trained (not the prompt, not the observation), and only the weights stored under
    the checkpoint's own names (HF fuses the routed experts, so those stay the tiny model's). After `a*b=` one token
    decides: `?` (then the call) or a digit (a guess). Returns the last batch's loss; the weights are written back
    in place.

    Calls are `tool_rows` of the episodes, so the call's format and the copying of `a*b` are learned quickly,
    but only `decision_keep` of them train the decision token, which moves towards `tool_share` (after the
    default 150 steps the model calls in about 5-15 % of episodes at temperature 1, nearly always correctly)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    tensors = load_file(str(ckpt / "model.safetensors"))
    for name, p in model.named_parameters():
        p.requires_grad_(name in tensors)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    decide = tok.convert_tokens_to_ids("?")
    for _ in range(cfg.steps):
        rows = []
        for _ in range(cfg.batch):
            ids, labels = _ids_and_labels(tok, episode(rng, call := rng.random() < cfg.tool_rows))
            if call and rng.random() >= cfg.decision_keep:
                labels[labels.index(decide)] = -100
            rows.append((ids, labels))
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in rows])  # (B, T), right-padded
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = model.state_dict()
    tensors.update({n: state[n].detach().contiguous() for n in tensors if n in state})
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    return loss.item()


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
