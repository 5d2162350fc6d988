"""MTP speculative decoding over HF's DynamicCache: draft with GLM-4.5's MTP layer, verify in one forward.

Why: GLM-4.5 ships one MTP (next-n) layer trained to predict token t+2. Drafting with it and verifying the
drafts with one main-model forward emits several tokens per forward, while the standard speculative-sampling
rule (`spec_rules.py`) keeps the output distribution exactly that of the main model — RL sees the same samples
and logprobs.

Alignment (HF's `MtpModel`, as `tools/make_tiny_model.py` trains it): MTP at position t takes the main model's
final-normed hidden state h_t and the embedding of token t+1 (position id t+1) and predicts token t+2. With
`num_steps` = k > 1 the same layer is chained on its own output hidden state (as SGLang does for one layer).

One decode step for a batch of rows, each with its last emitted token x_n (not yet fed) and drafts d_1..d_k:
1. verify: main forward over [x_n, d_1..d_k] (positions n..n+k) → p_0..p_k and hidden states h_n..h_{n+k};
2. per row, the acceptance rule (`spec_rules.accept`) emits a+1 tokens (a = drafts accepted);
3. MTP forward over the pairs (h_{n+i}, token n+i+1) for i = 0..a → next drafts.
Every row emits a+1 tokens per verify, so rows diverge: instead of cropping the shared `DynamicCache`, the
KV slots of rejected drafts stay in the cache and are masked out in the 2-D attention mask (explicit position
ids keep RoPE right). Each verify appends k+1 slots per row, and so does each MTP forward on its own cache.

What the engine returns is unchanged in shape and meaning: logprobs are log_softmax(target logits / T) at the
emitted token (T = 1 for greedy), as in the plain paths; routed experts come from the verify forwards, keeping
only the positions of tokens that stay in the sequence ([L - 1][n_moe][top_k] in the end). Per request the
rows also carry SGLang's speculation counters (`SpecRow`: `spec_verify_ct`, ...; acceptance length =
completion_tokens / spec_verify_ct, SGLang's definition, which counts the prefill's token too).

Weight names (`glm_rl.models.glm45.hf_names.mtp_named_tensors`): the MTP layer's tensors under the checkpoint's
names `model.layers.{num_hidden_layers + j}.*` — `enorm`, `hnorm`, `eh_proj`, `shared_head.norm` (HF's
`post_norm`) and the decoder layer (`mtp_block.*` in HF) with the in-memory names the main model's
`state_dict()` uses (fused `mlp.experts.gate_up_proj` / `down_proj`), so a trainer that exports
`state_dict()`-style names syncs the MTP layer too. The embedding and head are the main model's modules
(`model.embed_tokens.weight`, `lm_head.weight`): the disk copies `model.layers.N.embed_tokens.weight` /
`shared_head.head.weight` have no name of their own here.

The same steps over the preallocated caches: `static_speculative.py` (same acceptance code, same per-row
generators, so the tokens, logprobs, routed experts and counters are this path's; tests/test_engine_mtp.py
checks both).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from glm_rl.engine.batch import RouterCapture, SpecRow, survivors
from glm_rl.engine.decode.loop import step_rows
from glm_rl.engine.decode.spec_rules import accept, draft_all, record


def mtp_forward(
    mtp, hidden: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: DynamicCache
) -> tuple[torch.Tensor, torch.Tensor]:
    """MTP layer 0 over pairs (hidden[:, s], ids[:, s]) → logits [B, S, V] and output hidden states [B, S, H].

    HF's `MtpModel.forward_layer` builds its masks without a padding mask (batch 1 only); this is the same
    computation with our 2-D mask (`mask` covers the cached slots and the new ones).
    """
    embeds = mtp.embed_tokens(ids)  # (B, S, H)
    attn = create_causal_mask(
        config=mtp.config, inputs_embeds=embeds, attention_mask=mask, past_key_values=cache, position_ids=positions
    )
    rope = mtp.rotary_emb(embeds, position_ids=positions) if mtp.rotary_emb is not None else None
    out = mtp.layers[0](
        embeds, hidden, position_embeddings=rope, attention_mask=attn, position_ids=positions, past_key_values=cache
    )
    if mtp.use_shared_post_norm:
        out = mtp.shared_post_norm(out)
    return mtp._project_to_logits(out), out


@dataclass
class _Batch:
    """Decoding state of the active rows: both caches, their 2-D masks, and each row's pending drafts."""

    rows: list[SpecRow]
    active: list[int]
    cache: DynamicCache
    mtp_cache: DynamicCache
    mask: torch.Tensor  # (B, main cache slots)
    mtp_mask: torch.Tensor  # (B, MTP cache slots)
    drafts: list[list[int]]
    q: list[list[torch.Tensor | None]]

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mtp_cache.batch_select_indices(index)
        self.mask, self.mtp_mask = self.mask[index], self.mtp_mask[index]
        self.active = [self.active[b] for b in keep]


def _draft(
    mtp,
    batch: _Batch,
    hidden: torch.Tensor,
    ids: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    last: torch.Tensor,
    num_steps: int,
) -> None:
    """Append the new MTP pairs (valid slots only) to the MTP cache, then draft `num_steps` tokens per row
    from slot `last` of each row (chaining the layer on its own output hidden state)."""
    batch.mtp_mask = torch.cat([batch.mtp_mask, valid.to(batch.mtp_mask.dtype)], dim=1)
    logits, out = mtp_forward(mtp, hidden, ids, positions, batch.mtp_mask, batch.mtp_cache)
    rows_b = torch.arange(len(batch.active), device=ids.device)
    logits, out, pos = logits[rows_b, last], out[rows_b, last][:, None], positions[rows_b, last][:, None]
    batch.drafts, batch.q = [[] for _ in batch.active], [[] for _ in batch.active]
    for step in range(num_steps):
        draft_all(logits, batch.rows, batch.active, batch.drafts, batch.q)
        if step + 1 == num_steps:
            break
        pos = pos + 1
        chain_ids = torch.tensor([[d[-1]] for d in batch.drafts], device=ids.device)
        batch.mtp_mask = torch.cat([batch.mtp_mask, batch.mtp_mask.new_ones(len(batch.active), 1)], dim=1)
        logits, out = mtp_forward(mtp, out, chain_ids, pos, batch.mtp_mask, batch.mtp_cache)
        logits = logits[:, -1]
    if num_steps > 1:  # the chain's slots held draft states: later queries must not see them
        batch.mtp_mask[:, -(num_steps - 1) :] = 0


def _verify(model, batch: _Batch, capture: RouterCapture | None):
    """One verify forward and the acceptance rule for every active row; returns what the MTP step needs."""
    rows, k = batch.rows, len(batch.drafts[0])
    dev = batch.mask.device
    ids = torch.tensor([[rows[i].output_ids[-1], *d] for i, d in zip(batch.active, batch.drafts)], device=dev)
    start = torch.tensor([len(rows[i].req.input_ids) + len(rows[i].output_ids) - 1 for i in batch.active], device=dev)
    positions = start[:, None] + torch.arange(k + 1, device=dev)  # (B, k+1)
    batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.active), k + 1)], dim=1)
    hidden = model.model(
        input_ids=ids, attention_mask=batch.mask, position_ids=positions, past_key_values=batch.cache, use_cache=True
    ).last_hidden_state  # (B, k+1, H)
    logits = model.lm_head(hidden)  # (B, k+1, V)
    routed = capture.pop() if capture is not None else None
    emitted, accepted, logprobs = accept(logits, rows, batch.active, batch.drafts, batch.q)
    next_ids = [[0] * (k + 1) for _ in batch.active]
    for b, i in enumerate(batch.active):
        a = accepted[b]
        kept = record(rows[i], emitted[b], a, logprobs[b], k)
        if routed is not None:
            rows[i].routed.append(routed[b, :kept])
        batch.mask[b, batch.mask.shape[1] - k + a :] = 0  # slots of rejected drafts
        next_ids[b][: a + 1] = emitted[b]
    return hidden, torch.tensor(next_ids, device=dev), positions + 1, torch.tensor(accepted, device=dev)


def _prefill(
    model,
    mtp,
    batch: _Batch,
    pad_id: int,
    capture: RouterCapture | None,
    num_steps: int,
    should_abort: Callable[[], bool],
) -> None:
    """Prompt forward, the first token (sampled as in the plain path), MTP over the prompt, first drafts."""
    rows, dev = batch.rows, batch.mask.device
    lengths = [len(r.req.input_ids) for r in rows]
    width = max(lengths)
    ids = torch.tensor([[pad_id] * (width - n) + list(r.req.input_ids) for r, n in zip(rows, lengths)], device=dev)
    batch.mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], device=dev)
    positions = (batch.mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.model(
        input_ids=ids, attention_mask=batch.mask, position_ids=positions, past_key_values=batch.cache, use_cache=True
    ).last_hidden_state  # (B, W, H)
    if capture is not None:
        routed = capture.pop()
        for b, (row, n) in enumerate(zip(rows, lengths)):
            row.routed.append(routed[b, width - n :])
    step_rows(rows, batch.active, model.lm_head(hidden[:, -1]))
    keep = survivors(batch.rows, batch.active, should_abort)
    if not keep:
        return
    first = torch.tensor([[rows[i].output_ids[-1]] for i in range(len(rows))], device=dev)
    mtp_ids, mtp_mask = torch.cat([ids[:, 1:], first], dim=1), batch.mask
    batch.mtp_mask = mtp_mask[:, :0]
    sel = torch.tensor(keep, device=dev)
    if len(keep) < len(rows):
        batch.select(keep)
    last = torch.full((len(keep),), width - 1, device=dev)
    _draft(mtp, batch, hidden[sel], mtp_ids[sel], positions[sel] + 1, mtp_mask[sel], last, num_steps)


@torch.no_grad()
def run_speculative(
    model,
    mtp,
    rows: list[SpecRow],
    *,
    num_steps: int,
    pad_id: int,
    gates: list[torch.nn.Module],
    should_abort: Callable[[], bool],
) -> list[SpecRow]:
    """Decode `rows` to the end with `num_steps` MTP drafts per verify forward, over DynamicCaches."""
    dev = model.device
    capture = RouterCapture(gates) if any(r.req.return_routed_experts for r in rows) else None
    empty = torch.zeros(len(rows), 0, dtype=torch.long, device=dev)
    batch = _Batch(
        rows,
        list(range(len(rows))),
        DynamicCache(config=model.config),
        DynamicCache(config=mtp.config),
        empty,
        empty,
        [],
        [],
    )
    try:
        _prefill(model, mtp, batch, pad_id, capture, num_steps, should_abort)
        while any(rows[i].finish is None for i in batch.active):
            hidden, next_ids, positions, accepted = _verify(model, batch, capture)
            keep = survivors(batch.rows, batch.active, should_abort)
            if not keep:
                break
            if len(keep) < len(batch.active):
                sel = torch.tensor(keep, device=dev)
                hidden, next_ids, positions, accepted = hidden[sel], next_ids[sel], positions[sel], accepted[sel]
                batch.select(keep)
            valid = torch.arange(num_steps + 1, device=dev)[None] <= accepted[:, None]
            _draft(mtp, batch, hidden, next_ids, positions, valid, accepted, num_steps)
        return rows
    finally:
        if capture is not None:
            capture.remove()
