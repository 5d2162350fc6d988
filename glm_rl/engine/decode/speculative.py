"""MTP speculative decoding for the embedded engine: draft with GLM-4.5's MTP layer, verify in one forward.

Why: GLM-4.5 ships one MTP (next-n) layer trained to predict token t+2. Drafting with it and verifying the
drafts with one main-model forward emits several tokens per forward, while the standard speculative-sampling
rule keeps the output distribution exactly that of the main model — RL sees the same samples and logprobs.

Alignment (HF's `MtpModel`, as `tools/make_tiny_model.py` trains it): MTP at position t takes the main model's
final-normed hidden state h_t and the embedding of token t+1 (position id t+1) and predicts token t+2. With
`num_steps` = k > 1 the same layer is chained on its own output hidden state (as SGLang does for one layer).

One decode step for a batch of rows, each with its last emitted token x_n (not yet fed) and drafts d_1..d_k:
1. verify: main forward over [x_n, d_1..d_k] (positions n..n+k) → p_0..p_k and hidden states h_n..h_{n+k};
2. per row, `speculative_accept`: accept d_i with probability min(1, p(d_i)/q(d_i)); at the first rejection
   sample from normalize(max(p - q, 0)); if all k are accepted sample a bonus token from p_k. Greedy rows
   (temperature 0) accept while the draft equals argmax p and then emit argmax p;
3. MTP forward over the pairs (h_{n+i}, token n+i+1) for i = 0..a (a = drafts accepted) → next drafts.
Every row emits a+1 tokens per verify, so rows diverge: instead of cropping the shared `DynamicCache`, the
KV slots of rejected drafts stay in the cache and are masked out in the 2-D attention mask (explicit position
ids keep RoPE right). Each verify appends k+1 slots per row, and so does each MTP forward on its own cache.

What the engine returns is unchanged in shape and meaning: logprobs are log_softmax(target logits / T) at the
emitted token (T = 1 for greedy), as in `generation.py`; routed experts come from the verify forwards, keeping
only the positions of tokens that stay in the sequence ([L - 1][n_moe][top_k] in the end). Per request the
rows also carry SGLang's speculation counters (`spec_verify_ct`, ...; acceptance length = completion_tokens /
spec_verify_ct, SGLang's definition, which counts the prefill's token too).

Weight names (`glm_rl.models.glm45.hf_names.mtp_named_tensors`): the MTP layer's tensors under the checkpoint's names
`model.layers.{num_hidden_layers + j}.*` — `enorm`, `hnorm`, `eh_proj`, `shared_head.norm` (HF's
`post_norm`) and the decoder layer (`mtp_block.*` in HF) with the in-memory names the main model's
`state_dict()` uses (fused `mlp.experts.gate_up_proj` / `down_proj`), so a trainer that exports
`state_dict()`-style names syncs the MTP layer too. The embedding and head are the main model's modules
(`model.embed_tokens.weight`, `lm_head.weight`): the disk copies `model.layers.N.embed_tokens.weight` /
`shared_head.head.weight` have no name of their own here.

Over a `StaticDecoder` (static_decode.py, built with `mtp=`) the same steps run over preallocated caches:
slot == position, so instead of masking rejected drafts' slots a later step simply rewrites them; the MTP
layer's cache holds the pair of main position t at slot t (chained drafts' slots are rewritten the same way);
finished rows are compacted out of both caches. Same acceptance code, same per-row generators, so the tokens,
logprobs, routed experts and counters are the DynamicCache path's (tests/test_engine_mtp.py checks both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from glm_rl.engine.generation import (GenerationRequest, HostCopy, Row, new_rows, SamplingParams,
                                               _filter_logits, _RouterCapture, _step_rows, _survivors)


@dataclass
class SpecRow(Row):
    """A `Row` with SGLang's speculation counters."""

    verify_ct: int = 0        # verify forwards this request took part in
    draft_tokens: int = 0     # drafts proposed (k per verify)
    accepted_tokens: int = 0  # drafts the acceptance rule kept

    def spec_meta(self) -> dict[str, Any]:
        n = len(self.output_ids)
        return {"spec_verify_ct": self.verify_ct, "spec_draft_token_num": self.draft_tokens,
                "spec_accept_token_num": self.accepted_tokens,
                "spec_accept_length": n / self.verify_ct if self.verify_ct else float(n > 0)}


def accumulate_stats(stats: dict[str, Any], rows: Iterable[Row]) -> None:
    """Add the rows' speculation counters to the engine's stats (and the running acceptance length)."""
    for row in rows:
        if isinstance(row, SpecRow):
            stats["spec_verify_ct"] = stats.get("spec_verify_ct", 0) + row.verify_ct
            stats["spec_draft_tokens"] = stats.get("spec_draft_tokens", 0) + row.draft_tokens
            stats["spec_accept_tokens"] = stats.get("spec_accept_tokens", 0) + row.accepted_tokens
            stats["spec_completion_tokens"] = stats.get("spec_completion_tokens", 0) + len(row.output_ids)
    if stats.get("spec_verify_ct"):
        stats["avg_spec_accept_length"] = stats["spec_completion_tokens"] / stats["spec_verify_ct"]


# -- the acceptance rule -------------------------------------------------------------------------------------
def sampling_probs(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """softmax(filter(logits / T)) for each row of [n, V] logits (T > 0): what `generation.sample_tokens`
    draws from."""
    return torch.softmax(_filter_logits(logits.float() / sp.temperature, sp.top_k, sp.top_p), dim=-1)


def speculative_accept(p: torch.Tensor, q: torch.Tensor, drafts: list[int],
                       generator: torch.Generator) -> tuple[list[int], int]:
    """Standard speculative sampling (Leviathan et al. 2023, Chen et al. 2023): (emitted tokens, drafts kept).

    p: [k+1, V] target probabilities (p[i] given the prefix and drafts[:i]); q: [k, V] the distributions the
    drafts were sampled from. Draft i is kept with probability min(1, p_i(d)/q_i(d)); the first rejected one is
    replaced by a sample of normalize(max(p_i - q_i, 0)); if all k are kept a bonus token is drawn from p_k.
    Each emitted token is then distributed exactly as p given the tokens before it.
    """
    for i, d in enumerate(drafts):
        u = torch.rand((), generator=generator, device=p.device)
        if u * q[i, d] < p[i, d]:  # u < p/q without dividing (q[i, d] > 0: d was drawn from q)
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        weights = residual if float(residual.sum()) > 0 else p[i]  # p == q up to rounding: rejection ~never
        return drafts[:i] + [int(torch.multinomial(weights, 1, generator=generator))], i
    return drafts + [int(torch.multinomial(p[len(drafts)], 1, generator=generator))], len(drafts)


def _accept(logits: torch.Tensor, rows: list[Row], active: list[int], drafts: list[list[int]],
            q: list[list[torch.Tensor | None]]) -> tuple[list[list[int]], list[int], list[list[float]]]:
    """The acceptance rule for every active row: (emitted tokens, drafts kept, logprob of each emitted token).

    logits: [n, k+1, V] verify logits. Greedy rows (temperature 0) keep drafts while they equal argmax p, then
    emit argmax p; sampled rows go through `speculative_accept` with their own generator. The argmax and the
    logprobs (log_softmax(logits / T), T = 1 for greedy) cross to the host once for the batch."""
    logits = logits.float()
    temps = [rows[i].req.sampling.temperature for i in active]
    if max(temps) <= 0.0:
        return _accept_greedy(logits, drafts)
    best = logits.argmax(dim=-1).tolist() if min(temps) <= 0.0 else None
    scale = torch.tensor([t if t > 0.0 else 1.0 for t in temps], device=logits.device)
    logp = torch.log_softmax(logits / scale[:, None, None], dim=-1)
    emitted, accepted = [], []
    for b, i in enumerate(active):
        row, k = rows[i], len(drafts[b])
        if temps[b] <= 0.0:
            a = 0
            while a < k and drafts[b][a] == best[b][a]:
                a += 1
            tokens = drafts[b][:a] + [best[b][a]]
        else:
            tokens, a = speculative_accept(sampling_probs(logits[b], row.req.sampling), _stack(q[b]), drafts[b],
                                           row.generator)
        emitted.append(tokens)
        accepted.append(a)
    at_b, at_s, at_t = zip(*[(b, s, t) for b, tokens in enumerate(emitted) for s, t in enumerate(tokens)])
    flat = iter(logp[list(at_b), list(at_s), list(at_t)].tolist())
    return emitted, accepted, [[next(flat) for _ in tokens] for tokens in emitted]


def _accept_greedy(logits: torch.Tensor, drafts: list[list[int]]):
    """`_accept` when every row is greedy: the emitted tokens are argmax p at positions 0..a (the kept drafts
    equal it), so the argmax and its logprob at every position cross to the host in one copy, before the host
    knows a."""
    best = logits.argmax(dim=-1)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, best[..., None]).squeeze(-1)
    emitted, accepted, logprobs = [], [], []
    for d, row in zip(drafts, HostCopy(best, logp).rows()):
        b, lp = row[:len(d) + 1], row[len(d) + 1:]
        a = 0
        while a < len(d) and d[a] == b[a]:
            a += 1
        emitted.append([int(t) for t in b[:a + 1]])
        accepted.append(a)
        logprobs.append(lp[:a + 1])
    return emitted, accepted, logprobs


def _record(row: SpecRow, tokens: list[int], a: int, logprobs: list[float], k: int) -> int:
    """Count one verify in the row's speculation counters and emit its tokens; returns how many were kept."""
    row.verify_ct, row.draft_tokens, row.accepted_tokens = (row.verify_ct + 1, row.draft_tokens + k,
                                                            row.accepted_tokens + a)
    return _emit(row, tokens, logprobs)


def _draft_row(logits: torch.Tensor, row: Row, best: int | None = None) -> tuple[int, torch.Tensor | None]:
    """One draft token from MTP logits [V] and the distribution it came from (None for greedy rows, whose
    draft is argmax(logits): `best` when the caller took it for the whole batch)."""
    sp = row.req.sampling
    if sp.temperature <= 0.0:
        return (int(torch.argmax(logits)) if best is None else best), None
    q = sampling_probs(logits[None], sp)[0]
    return int(torch.multinomial(q, 1, generator=row.generator)), q


def _draft_all(logits: torch.Tensor, rows: list[Row], active: list[int], drafts: list[list[int]],
               q: list[list[torch.Tensor | None]]) -> None:
    """Append one draft per active row (`_draft_row`) from MTP logits [n, V]; greedy rows' argmax crosses to
    the host once for the batch."""
    greedy = any(rows[i].req.sampling.temperature <= 0.0 for i in active)
    best = logits.argmax(dim=-1).tolist() if greedy else [None] * len(active)
    for b, i in enumerate(active):
        token, dist = _draft_row(logits[b].float(), rows[i], best[b])
        drafts[b].append(token)
        q[b].append(dist)


# -- batched forwards ----------------------------------------------------------------------------------------
def _mtp_forward(mtp, hidden: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 cache: DynamicCache) -> torch.Tensor:
    """MTP layer 0 over pairs (hidden[:, s], ids[:, s]) → logits [B, S, V] and output hidden states [B, S, H].

    HF's `MtpModel.forward_layer` builds its masks without a padding mask (batch 1 only); this is the same
    computation with our 2-D mask (`mask` covers the cached slots and the new ones).
    """
    embeds = mtp.embed_tokens(ids)                                         # (B, S, H)
    attn = create_causal_mask(config=mtp.config, inputs_embeds=embeds, attention_mask=mask,
                              past_key_values=cache, position_ids=positions)
    rope = mtp.rotary_emb(embeds, position_ids=positions) if mtp.rotary_emb is not None else None
    out = mtp.layers[0](embeds, hidden, position_embeddings=rope, attention_mask=attn, position_ids=positions,
                        past_key_values=cache)
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
    mask: torch.Tensor                      # (B, main cache slots)
    mtp_mask: torch.Tensor                  # (B, MTP cache slots)
    drafts: list[list[int]]
    q: list[list[torch.Tensor | None]]

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mtp_cache.batch_select_indices(index)
        self.mask, self.mtp_mask = self.mask[index], self.mtp_mask[index]
        self.active = [self.active[b] for b in keep]


def _draft(mtp, batch: _Batch, hidden: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
           valid: torch.Tensor, last: torch.Tensor, num_steps: int) -> None:
    """Append the new MTP pairs (valid slots only) to the MTP cache, then draft `num_steps` tokens per row
    from slot `last` of each row (chaining the layer on its own output hidden state)."""
    batch.mtp_mask = torch.cat([batch.mtp_mask, valid.to(batch.mtp_mask.dtype)], dim=1)
    logits, out = _mtp_forward(mtp, hidden, ids, positions, batch.mtp_mask, batch.mtp_cache)
    rows_b = torch.arange(len(batch.active), device=ids.device)
    logits, out, pos = logits[rows_b, last], out[rows_b, last][:, None], positions[rows_b, last][:, None]
    batch.drafts, batch.q = [[] for _ in batch.active], [[] for _ in batch.active]
    for step in range(num_steps):
        _draft_all(logits, batch.rows, batch.active, batch.drafts, batch.q)
        if step + 1 == num_steps:
            break
        pos = pos + 1
        chain_ids = torch.tensor([[d[-1]] for d in batch.drafts], device=ids.device)
        batch.mtp_mask = torch.cat([batch.mtp_mask, batch.mtp_mask.new_ones(len(batch.active), 1)], dim=1)
        logits, out = _mtp_forward(mtp, out, chain_ids, pos, batch.mtp_mask, batch.mtp_cache)
        logits = logits[:, -1]
    if num_steps > 1:  # the chain's slots held draft states: later queries must not see them
        batch.mtp_mask[:, -(num_steps - 1):] = 0


def _emit(row: SpecRow, tokens: list[int], logprobs: list[float]) -> int:
    """Append tokens until the row finishes (stop id / max_new_tokens); returns how many were kept."""
    for n, (token, logprob) in enumerate(zip(tokens, logprobs), start=1):
        if row.emit(token, logprob):
            return n
    return len(tokens)


def _verify(model, batch: _Batch, capture: _RouterCapture | None):
    """One verify forward and the acceptance rule for every active row; returns what the MTP step needs."""
    rows, k = batch.rows, len(batch.drafts[0])
    dev = batch.mask.device
    ids = torch.tensor([[rows[i].output_ids[-1], *d] for i, d in zip(batch.active, batch.drafts)], device=dev)
    start = torch.tensor([len(rows[i].req.input_ids) + len(rows[i].output_ids) - 1 for i in batch.active],
                         device=dev)
    positions = start[:, None] + torch.arange(k + 1, device=dev)           # (B, k+1)
    batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.active), k + 1)], dim=1)
    hidden = model.model(input_ids=ids, attention_mask=batch.mask, position_ids=positions,
                         past_key_values=batch.cache, use_cache=True).last_hidden_state  # (B, k+1, H)
    logits = model.lm_head(hidden)                                          # (B, k+1, V)
    routed = capture.pop() if capture is not None else None
    emitted, accepted, logprobs = _accept(logits, rows, batch.active, batch.drafts, batch.q)
    next_ids = [[0] * (k + 1) for _ in batch.active]
    for b, i in enumerate(batch.active):
        a = accepted[b]
        kept = _record(rows[i], emitted[b], a, logprobs[b], k)
        if routed is not None:
            rows[i].routed.append(routed[b, :kept])
        batch.mask[b, batch.mask.shape[1] - k + a:] = 0                     # slots of rejected drafts
        next_ids[b][:a + 1] = emitted[b]
    return hidden, torch.tensor(next_ids, device=dev), positions + 1, torch.tensor(accepted, device=dev)


def _stack(q: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if not q or q[0] is None else torch.stack(q)


def _prefill(model, mtp, batch: _Batch, pad_id: int, capture: _RouterCapture | None, num_steps: int,
             should_abort: Callable[[], bool]) -> None:
    """Prompt forward, the first token (sampled as in the plain path), MTP over the prompt, first drafts."""
    rows, dev = batch.rows, batch.mask.device
    lengths = [len(r.req.input_ids) for r in rows]
    width = max(lengths)
    ids = torch.tensor([[pad_id] * (width - n) + list(r.req.input_ids) for r, n in zip(rows, lengths)], device=dev)
    batch.mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], device=dev)
    positions = (batch.mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.model(input_ids=ids, attention_mask=batch.mask, position_ids=positions,
                         past_key_values=batch.cache, use_cache=True).last_hidden_state  # (B, W, H)
    if capture is not None:
        routed = capture.pop()
        for b, (row, n) in enumerate(zip(rows, lengths)):
            row.routed.append(routed[b, width - n:])
    _step_rows(rows, batch.active, model.lm_head(hidden[:, -1]))
    keep = _keep(batch, should_abort)
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


def _keep(batch: _Batch, should_abort: Callable[[], bool]) -> list[int]:
    """Indices (into `batch.active`) of rows still running; on abort, every running row finishes."""
    keep = [b for b, i in enumerate(batch.active) if batch.rows[i].finish is None]
    if keep and should_abort():
        for b in keep:
            batch.rows[batch.active[b]].finish = {"type": "abort", "message": "aborted by pause_generation"}
        keep = []
    return keep


@torch.no_grad()
def run_batch_speculative(model, mtp, requests: list[GenerationRequest], *, num_steps: int, eos_ids: Iterable[int],
                          pad_id: int, gates: list[torch.nn.Module], should_abort: Callable[[], bool],
                          decoder=None) -> list[SpecRow]:
    """`generation.run_batch` with MTP speculative decoding (`num_steps` drafts per verify forward); with a
    `StaticDecoder` built with `mtp=mtp` the batch runs over its preallocated caches, else over DynamicCaches."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if decoder is not None and decoder.mtp is not mtp:
        raise ValueError("run_batch_speculative: the StaticDecoder must be built with this MTP module "
                         "(StaticDecoder(model, ..., mtp=mtp))")
    if decoder is not None and len(requests) > decoder.max_batch:
        raise ValueError(f"run_batch_speculative: {len(requests)} requests exceed the StaticDecoder's "
                         f"max_batch={decoder.max_batch}")
    dev = model.device
    rows = new_rows(model, requests, eos_ids, SpecRow)
    if decoder is not None:
        return _StaticSpec(decoder, rows, num_steps).run(pad_id, should_abort)
    capture = _RouterCapture(gates) if any(r.return_routed_experts for r in requests) else None
    empty = torch.zeros(len(rows), 0, dtype=torch.long, device=dev)
    batch = _Batch(rows, list(range(len(rows))), DynamicCache(config=model.config),
                   DynamicCache(config=mtp.config), empty, empty, [], [])
    try:
        _prefill(model, mtp, batch, pad_id, capture, num_steps, should_abort)
        while any(rows[i].finish is None for i in batch.active):
            hidden, next_ids, positions, accepted = _verify(model, batch, capture)
            keep = _keep(batch, should_abort)
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


class _StaticSpec:
    """The speculative loop over a StaticDecoder: live rows are cache rows 0..n-1 of both caches (compacted
    when rows finish). Main cache: token at position p in slot p. MTP cache: the pair (h_t, token t+1), HF
    position id t+1, in slot t. A verify writes slots start..start+k, the MTP forward after it slots
    start..start+a (+ chained drafts after that); whatever rejected drafts left there is rewritten before any
    query can see it, since queries see only slots <= their own."""

    fused_greedy = True  # one draft, greedy rows: `_run_greedy` (False: the general loop; tests compare the two)

    def __init__(self, decoder, rows: list[SpecRow], num_steps: int) -> None:
        self.decoder, self.rows, self.k = decoder, rows, num_steps
        self.active = list(range(len(rows)))
        self.want_routed = any(r.req.return_routed_experts for r in rows)
        self.drafts: list[list[int]] = []
        self.q: list[list[torch.Tensor | None]] = []

    def run(self, pad_id: int, should_abort: Callable[[], bool]) -> list[SpecRow]:
        rows, dev, k = self.rows, self.decoder.device, self.k
        # verify positions reach prompt + max_new - 2 + k, chained MTP slots a further k - 1
        self.decoder.reserve(max(len(r.req.input_ids) + r.req.sampling.max_new_tokens for r in rows) + 2 * k)
        logits, hidden, routed = self.decoder.prefill_states([r.req.input_ids for r in rows], pad_id)
        lengths = [len(r.req.input_ids) for r in rows]
        if self.want_routed:
            for b, (row, n) in enumerate(zip(rows, lengths)):
                row.routed.append(routed[b, :n])
        _step_rows(rows, self.active, logits)
        keep = _survivors(rows, self.active, should_abort)
        if not keep:
            return rows
        # MTP over the prompt: pairs (h_t, token t+1), the last one's token being the first sampled token
        width = hidden.shape[1]
        ids = [list(r.req.input_ids[1:]) + [r.output_ids[-1]] + [pad_id] * (width - n) for r, n in zip(rows, lengths)]
        self._select(keep, span=width)
        sel = torch.tensor(keep, device=dev)
        positions = torch.arange(1, width + 1, device=dev).expand(len(keep), width)
        mtp_logits, out = self.decoder.mtp_forward(hidden[sel], torch.tensor(ids, device=dev)[sel], positions,
                                                   graph=False)  # one shape per prompt width: eager
        self._draft(mtp_logits, out, positions, torch.tensor([lengths[i] - 1 for i in self.active], device=dev))
        if self.fused_greedy and k == 1 and all(r.req.sampling.temperature <= 0.0 for r in rows):
            return self._run_greedy(should_abort)
        while True:
            hidden, next_ids, positions, accepted, starts, kept = self._verify()
            keep = _survivors(rows, self.active, should_abort)
            if not keep:
                return rows
            if len(keep) < len(self.active):
                sel = torch.tensor(keep, device=dev)
                # main slots below each row's next verify start are written; MTP slots are behind them
                self._select(keep, span=max(starts[b] + kept[b] for b in keep) + 1)
                hidden, next_ids, positions, accepted = hidden[sel], next_ids[sel], positions[sel], accepted[sel]
                starts = [starts[b] for b in keep]
            # positions + 1 reach start + k + 1: known on the host, so nothing here waits for the GPU
            mtp_logits, out = self.decoder.mtp_forward(hidden, next_ids, positions + 1,
                                                       max_position=max(starts) + k + 1)
            self._draft(mtp_logits, out, positions + 1, accepted)

    def _run_greedy(self, should_abort: Callable[[], bool]) -> list[SpecRow]:
        """The loop for one draft and greedy rows (RL evaluation, `glm-rl generate --temperature 0`): each step
        is the decoder's fused `verify_greedy` — verify, acceptance and the next draft in one graph, whose
        outputs include the next step's inputs — so the next step is queued before the host reads this one (one
        copy to the host per step; rows found finished drop what their queued step computed). The same tokens,
        logprobs and counters as the general loop."""
        rows = self.rows
        starts = [len(rows[i].req.input_ids) + len(rows[i].output_ids) - 1 for i in self.active]
        out = self.decoder.verify_greedy([[rows[i].output_ids[-1], d[0]] for i, d in zip(self.active, self.drafts)],
                                         starts)
        while True:
            best, logp, draft, kept, next_ids, next_pos, routed = out
            # this step's results to the host (argmax at both positions, drafts kept, both logprobs; ids < 2^53
            # are exact in float64), copied before the queued step rewrites the graph's buffers
            fetched = HostCopy(best, kept, logp)
            if self.want_routed:
                routed = routed.clone()
            out = self.decoder.verify_greedy_queued(next_ids, next_pos, max(starts) + 2)  # a start grows <= 2
            for b, (i, (t0, t1, a, lp0, lp1)) in enumerate(zip(self.active, fetched.rows())):
                a = int(a)
                n = _record(rows[i], [int(t0), int(t1)][:a + 1], a, [lp0, lp1][:a + 1], 1)
                if self.want_routed:
                    rows[i].routed.append(routed[b, :n])
                starts[b] += a + 1
            keep = _survivors(rows, self.active, should_abort)
            if not keep:
                return rows
            if len(keep) < len(self.active):  # the queued step ran for every row: keep the survivors' part
                index = torch.tensor(keep, device=self.decoder.device)
                out = tuple(t[index] if t is not None else None for t in out)
                starts = [starts[b] for b in keep]
                self._select(keep, span=max(starts) + 2)  # the queued step wrote slots start, start + 1

    def _select(self, keep: list[int], span: int) -> None:
        if len(keep) < len(self.active):
            self.decoder.compact(keep, span)
            self.active = [self.active[b] for b in keep]

    def _draft(self, logits: torch.Tensor, out: torch.Tensor, positions: torch.Tensor, last: torch.Tensor) -> None:
        """`num_steps` drafts per row from the MTP outputs at column `last` of each row (chaining the layer on
        its own output hidden state)."""
        rows_b = torch.arange(len(self.active), device=logits.device)
        logits, out, pos = logits[rows_b, last], out[rows_b, last][:, None], positions[rows_b, last][:, None]
        self.drafts, self.q = [[] for _ in self.active], [[] for _ in self.active]
        for step in range(self.k):
            _draft_all(logits, self.rows, self.active, self.drafts, self.q)
            if step + 1 == self.k:
                break
            pos = pos + 1
            chain_ids = torch.tensor([[d[-1]] for d in self.drafts], device=logits.device)
            logits, out = self.decoder.mtp_forward(out.clone(), chain_ids, pos)
            logits = logits[:, -1]

    def _verify(self):
        """One verify over the decoder and the acceptance rule for every row; returns what the MTP step needs:
        hidden states [n, k+1, H], the tokens after them [n, k+1], their positions [n, k+1], drafts kept [n],
        and on the host each row's verify start and drafts kept."""
        rows, k, dev = self.rows, self.k, self.decoder.device
        starts = [len(rows[i].req.input_ids) + len(rows[i].output_ids) - 1 for i in self.active]
        logits, hidden, routed = self.decoder.verify(
            [[rows[i].output_ids[-1], *d] for i, d in zip(self.active, self.drafts)], starts)
        emitted, accepted, logprobs = _accept(logits, rows, self.active, self.drafts, self.q)
        if self.want_routed:
            routed = routed.clone()  # a graph buffer: the next verify rewrites it
        next_ids = [[0] * (k + 1) for _ in self.active]
        for b, i in enumerate(self.active):
            kept = _record(rows[i], emitted[b], accepted[b], logprobs[b], k)
            if self.want_routed:
                rows[i].routed.append(routed[b, :kept])
            next_ids[b][:accepted[b] + 1] = emitted[b]
        n = len(starts)
        host = np.empty((n, 2 * (k + 1) + 1), dtype=np.int64)  # next ids | positions | accepted: one copy
        host[:, :k + 1] = next_ids
        host[:, k + 1:-1] = np.asarray(starts)[:, None] + np.arange(k + 1)
        host[:, -1] = accepted
        packed = self.decoder.to_device(host)
        return (hidden, packed[:, :k + 1], packed[:, k + 1:-1], packed[:, -1], starts, accepted)
