"""Make the shipped tiny GLM-4.5 checkpoint and its arithmetic task (seeded, reproducible).

    python tools/make_tiny_model.py [--out glm_rl/assets] [--seed 0]

What it writes:
- `<out>/arith/{train,eval}.jsonl`: prompts "a+b" with `label` = a+b (operands of 1-3 digits; eval
  problems never appear in training).
- `<out>/glm45-tiny/`: HF checkpoint (config.json, model.safetensors, tokenizer.json, tokenizer_config.json
  with a GLM-style chat template, generation_config.json). The model has every GLM-4.5-355B feature and an
  MTP layer stored as `model.layers.{num_hidden_layers}.*`, trained to predict token t+2.

The model is trained by supervised learning on responses "a+b=c" in which a share of the answers
(`--answer-noise`, default 60 %) has one digit replaced at random: it learns the sum (greedy accuracy high)
but samples a wrong digit often, so at temperature 1 it solves some but far from all problems — room that RL
can reclaim by sharpening what the model knows. Training stops once greedy accuracy reaches `--min-greedy`
and accuracy at temperature 1 lies in `--band`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, Glm4MoeForCausalLM, PreTrainedTokenizerFast
from transformers.modeling_layers import MtpModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from glm_rl.evaluate import chat_prompt_ids, evaluate  # noqa: E402
from glm_rl.models.glm45.checkpoint import save_hf_checkpoint  # noqa: E402
from glm_rl.models.glm45.presets import glm45_tiny  # noqa: E402
from glm_rl.rollout.data import PromptRow  # noqa: E402
from glm_rl.rollout.rewards import arithmetic_reward  # noqa: E402

SPECIAL = ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
CHARS = list("0123456789+-*=? \n")
CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<|endoftext|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Character-level `tokenizers` tokenizer; GLM's special tokens; chat template in GLM's shape."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    assert len(vocab) <= vocab_size, (len(vocab), vocab_size)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    return fast


def random_problem(rng: random.Random) -> tuple[int, int]:
    def operand() -> int:
        digits = rng.randint(1, 3)
        return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)

    return operand(), operand()


def make_task(out: Path, rng: random.Random, n_train: int, n_eval: int) -> tuple[list, set]:
    seen: set[tuple[int, int]] = set()
    eval_set = []
    while len(eval_set) < n_eval:
        p = random_problem(rng)
        if p not in seen:
            seen.add(p)
            eval_set.append(p)
    train_set = []
    while len(train_set) < n_train:
        p = random_problem(rng)
        if p not in seen:
            train_set.append(p)
    (out / "arith").mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train_set), ("eval", eval_set)):
        with open(out / "arith" / f"{name}.jsonl", "w") as f:
            for a, b in rows:
                f.write(json.dumps({"prompt": f"{a}+{b}", "label": str(a + b)}) + "\n")
    return eval_set, seen


def noisy_answer(answer: int, rng: random.Random, noise: float) -> str:
    """The answer, or (with probability `noise`) the answer with one digit replaced by a different one."""
    text = str(answer)
    if rng.random() >= noise:
        return text
    i = rng.randrange(len(text))
    digit = rng.choice([d for d in "0123456789" if d != text[i]])
    return text[:i] + digit + text[i + 1 :]


def encode_batch(tokenizer, problems, eos_id: int, rng: random.Random, noise: float):
    """(input_ids, loss_mask) right-padded; loss on response tokens (incl. the final eos)."""
    seqs, masks = [], []
    for a, b in problems:
        prompt = chat_prompt_ids(tokenizer, f"{a}+{b}")
        answer = noisy_answer(a + b, rng, noise)
        response = tokenizer.encode(f"{a}+{b}={answer}", add_special_tokens=False) + [eos_id]
        seqs.append(prompt + response)
        masks.append([0] * len(prompt) + [1] * len(response))
    width = max(map(len, seqs))
    ids = torch.tensor([s + [eos_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.float32)
    return ids, mask


def losses(model, mtp, ids, mask):
    """Next-token loss of the main model and t+2 loss of the MTP layer (HF's own MTP path)."""
    out = model.model(ids, output_hidden_states=True)
    hidden = out.last_hidden_state  # (B, T, H), after the final norm: HF's MTP input convention
    logits = model.lm_head(hidden)
    main = (F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none") * mask[:, 1:]).sum()
    main = main / mask[:, 1:].sum()
    # MTP at position t sees h_t and the embedding of token t+1, and predicts token t+2.
    pos = torch.arange(ids.shape[1] - 1).unsqueeze(0).expand(ids.shape[0], -1) + 1
    h_mtp = mtp.forward_layer(0, hidden[:, :-1], pos, None, input_ids=ids[:, 1:])
    mtp_logits = mtp._project_to_logits(h_mtp)[:, :-1]  # predicts ids[:, 2:]
    m2 = mask[:, 2:]
    mtp_loss = (F.cross_entropy(mtp_logits.transpose(1, 2), ids[:, 2:], reduction="none") * m2).sum() / m2.sum()
    return main, mtp_loss


class ExpertBiasUpdater:
    """Aux-loss-free load balancing (as GLM-4.5 / DeepSeek-V3 train): after each step, raise the
    `e_score_correction_bias` of under-loaded experts and lower it for over-loaded ones by `rate`."""

    def __init__(self, routers, rate: float):
        self.rate, self.loads = rate, {}
        for router in routers:
            router.register_forward_hook(self._record)

    def _record(self, router, _inputs, outputs) -> None:
        counts = torch.bincount(outputs[2].flatten(), minlength=router.num_experts).float()
        self.loads[router] = self.loads.get(router, 0) + counts

    @torch.no_grad()
    def step(self) -> None:
        for router, load in self.loads.items():
            router.e_score_correction_bias += self.rate * torch.sign(load.mean() - load)
        self.loads = {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "glm_rl" / "assets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-steps", type=int, default=6000)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--min-steps", type=int, default=300)
    ap.add_argument("--band", type=float, nargs=2, default=(0.2, 0.5), help="target accuracy at temperature 1")
    ap.add_argument("--min-greedy", type=float, default=0.8, help="target greedy accuracy")
    ap.add_argument("--answer-noise", type=float, default=0.6, help="share of training answers with a wrong digit")
    ap.add_argument("--mtp-loss-weight", type=float, default=0.3)
    ap.add_argument("--bias-update-rate", type=float, default=1e-3)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    spec = glm45_tiny()
    tokenizer = build_tokenizer(spec.vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    user_id = tokenizer.convert_tokens_to_ids("<|user|>")
    cfg = spec.to_hf_config(eos_token_id=[eos_id, user_id], pad_token_id=eos_id, bos_token_id=None, dtype="float32")
    model = Glm4MoeForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        eos_token_id=[eos_id, user_id], pad_token_id=eos_id, do_sample=True, temperature=1.0, top_p=1.0, top_k=0
    )
    mtp = MtpModel(model, 1)
    eval_problems, held_out = make_task(args.out, rng, args.n_train, args.n_eval)
    eval_rows = [PromptRow(prompt=f"{a}+{b}", label=str(a + b), index=i) for i, (a, b) in enumerate(eval_problems)]

    routers = [m for n, m in list(model.named_modules()) + list(mtp.named_modules()) if n.endswith("mlp.gate")]
    balancer = ExpertBiasUpdater(routers, args.bias_update_rate)
    params = list(model.parameters()) + [
        p for n, p in mtp.named_parameters() if not n.startswith(("embed_tokens", "shared_head"))
    ]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    t0 = time.time()
    acc = greedy = 0.0
    for step in range(1, args.max_steps + 1):
        batch = []
        while len(batch) < args.batch_size:
            p = random_problem(rng)
            if p not in held_out:
                batch.append(p)
        ids, mask = encode_batch(tokenizer, batch, eos_id, rng, args.answer_noise)
        main_loss, mtp_loss = losses(model, mtp, ids, mask)
        opt.zero_grad()
        (main_loss + args.mtp_loss_weight * mtp_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        balancer.step()
        if step % args.eval_every == 0 and step >= args.min_steps:
            model.eval()
            acc = evaluate(model, tokenizer, eval_rows, arithmetic_reward, temperature=1.0, seed=args.seed).accuracy
            greedy = evaluate(model, tokenizer, eval_rows, arithmetic_reward, temperature=0.0).accuracy
            model.train()
            print(
                f"step {step:5d}  loss {main_loss.item():.4f}  mtp {mtp_loss.item():.4f}  "
                f"acc@T1 {acc:.3f}  greedy {greedy:.3f}  {time.time() - t0:.0f}s",
                flush=True,
            )
            if args.band[0] <= acc <= args.band[1] and greedy >= args.min_greedy:
                break
        elif step % 50 == 0:
            print(
                f"step {step:5d}  loss {main_loss.item():.4f}  mtp {mtp_loss.item():.4f}  {time.time() - t0:.0f}s",
                flush=True,
            )
    else:
        raise SystemExit(f"accuracy {acc:.3f} never entered the band {args.band} in {args.max_steps} steps")
    model.eval()
    save_hf_checkpoint(model, mtp, tokenizer, args.out / "glm45-tiny")
    print(f"saved {args.out / 'glm45-tiny'} at step {step}, accuracy at T=1 {acc:.3f}, greedy {greedy:.3f}")


if __name__ == "__main__":
    main()
