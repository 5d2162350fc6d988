"""Train the MTP (drafter) layer on the main model's own outputs: self-distillation.

Why: MTP speculative decoding only pays when the drafter guesses what the main model will say. A checkpoint whose
MTP layer is random (the benchmarks' random-init models) or stale (after RL moved the main model) drafts tokens
the main model rejects. Training the MTP layer alone — main model frozen — on sequences the main model itself
generated, towards the main model's own next-token distribution, gives it the acceptance a real drafter has,
in minutes on a GPU (issue 21: "MTP with a real drafter").

The objective at position t (MTP sees the main model's final hidden state h_t and the embedding of token t+1,
and drafts token t+2): forward KL from the main model's distribution at t+1 (its prediction of token t+2) to the
drafter's, over the generated positions. The shared embedding and head stay the main model's.

`acceptance` is the metric that matters for greedy speculative decoding: the share of positions where the
drafter's argmax equals the main model's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DistillBatch:
    """Token sequences (B, T) and which positions t are trained: MTP's draft of token t+2 (B, T-2)."""

    ids: torch.Tensor
    mask: torch.Tensor


def batch_from(sequences: list[list[int]], prompt_lens: list[int], pad_id: int, device) -> DistillBatch:
    """Right-padded ids; a position t counts when token t+2 is a generated (not prompt, not pad) token."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), max(width - 2, 0))
    for i, (seq, p) in enumerate(zip(sequences, prompt_lens)):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, max(p - 2, 0) : len(seq) - 2] = 1.0
    return DistillBatch(ids.to(device), mask.to(device))


def _logits(model, mtp, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(main model's logits at t+1 for t in [0, T-2), drafter's logits at t): both predict token t+2."""
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state  # after the final norm: HF's MTP input convention
        teacher = model.lm_head(hidden[:, 1:-1]).float()
    pos = torch.arange(1, ids.shape[1], device=ids.device).unsqueeze(0).expand(ids.shape[0], -1)
    drafted = mtp.forward_layer(0, hidden[:, :-1], pos, None, input_ids=ids[:, 1:])
    return teacher, mtp._project_to_logits(drafted[:, :-1]).float()


def _agreeing(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor) -> float:
    """How many counted positions have the drafter's argmax equal to the main model's."""
    return ((teacher.argmax(-1) == student.argmax(-1)).float() * mask).sum().item()


def distill_loss(model, mtp, batch: DistillBatch) -> tuple[torch.Tensor, float]:
    """(forward KL(main ‖ drafter) averaged over the batch's positions, acceptance: argmax agreement there)."""
    teacher, student = _logits(model, mtp, batch.ids)
    kl = (F.softmax(teacher, -1) * (F.log_softmax(teacher, -1) - F.log_softmax(student, -1))).sum(-1)
    n = batch.mask.sum().clamp(min=1)
    return (kl * batch.mask).sum() / n, _agreeing(teacher, student, batch.mask) / n.item()


@torch.no_grad()
def acceptance(model, mtp, batches: list[DistillBatch]) -> float:
    """The share of counted positions where the drafter's argmax is the main model's (all batches)."""
    agree = total = 0.0
    for b in batches:
        agree += _agreeing(*_logits(model, mtp, b.ids), b.mask)
        total += b.mask.sum().item()
    return agree / max(total, 1.0)


def drafter_parameters(mtp) -> list[torch.nn.Parameter]:
    """The MTP layer's own parameters (its decoder block, norms, projection); not the shared embedding / head,
    and not the router's `e_score_correction_bias` (a buffer, set by load balancing, not by gradients)."""
    return [p for n, p in mtp.named_parameters() if not n.startswith(("embed_tokens", "shared_head"))]


def distill(
    model,
    mtp,
    train: list[DistillBatch],
    held_out: list[DistillBatch],
    *,
    steps: int,
    lr: float = 1e-3,
    log: Callable[[str], None] = print,
    log_every: int = 50,
) -> dict:
    """AdamW on the drafter's parameters over `train` (cycled) for `steps`; the main model is not changed (and
    every parameter's requires_grad is as it was). Returns held-out acceptance before and after, the last loss
    and the time taken."""
    if not train or not held_out:
        raise ValueError(f"distill: {len(train)} training and {len(held_out)} held-out batches; need at least one each")
    flags = {p: p.requires_grad for p in [*model.parameters(), *mtp.parameters()]}  # restored at the end
    for p in flags:
        p.requires_grad_(False)
    params = drafter_parameters(mtp)
    for p in params:
        p.requires_grad_(True)
    before = acceptance(model, mtp, held_out)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    t0, loss = time.time(), float("nan")
    mtp.train()
    for step in range(1, steps + 1):
        batch = train[(step - 1) % len(train)]
        value, agree = distill_loss(model, mtp, batch)
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss = value.item()
        if step % log_every == 0 or step == steps:
            log(f"drafter step {step}/{steps}: KL {loss:.4f}, train acceptance {agree:.3f}, {time.time() - t0:.0f} s")
    mtp.eval()
    for p, flag in flags.items():
        p.requires_grad_(flag)
    after = acceptance(model, mtp, held_out)
    return {"acceptance_before": before, "acceptance_after": after, "loss": loss, "seconds": time.time() - t0}


def greedy_batches(
    model, prompts: list[list[int]], *, new_tokens: int, eos_ids: list[int], pad_id: int, batch_size: int
) -> list[DistillBatch]:
    """The main model's greedy continuations of `prompts` (the embedded engine's batch decode: the text the
    drafter will be asked to guess), as `batch_size`-row distillation batches."""
    from glm_rl.engine.batch import GenerationRequest, SamplingParams
    from glm_rl.engine.decode import run_batch

    greedy = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        requests = [GenerationRequest(str(j), tuple(p), greedy, seed=j) for j, p in enumerate(chunk)]
        rows = run_batch(model, requests, eos_ids=eos_ids, pad_id=pad_id, gates=[], should_abort=lambda: False)
        seqs = [list(p) + r.output_ids for p, r in zip(chunk, rows)]
        out.append(batch_from(seqs, [len(p) for p in chunk], pad_id, device))
    return out
