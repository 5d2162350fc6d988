"""The per-row rules of MTP speculative decoding, shared by both caches' loops (`speculative.py`,
`static_speculative.py`): draft, accept, count.

Why apart from the loops: the two loops differ only in where the KV slots live; drafting and accepting are the
same code with the same per-row generators, so both return the same tokens, logprobs and counters.
- `draft_row` / `draft_all`: one draft per row from MTP logits — argmax for greedy rows, else a sample of
  `sampling_probs` (q) with the row's generator.
- `speculative_accept` (Leviathan et al. 2023, Chen et al. 2023): accept d_i with probability min(1, p(d_i) /
  q(d_i)); at the first rejection sample from normalize(max(p - q, 0)); if all k are accepted sample a bonus
  token from p_k. Greedy rows (temperature 0) accept while the draft equals argmax p and then emit argmax p
  (`accept`). Each emitted token is distributed exactly as the target model's p, so RL sees the same samples.
- `record`: count one verify in the row's SGLang counters and emit its tokens.
"""

from __future__ import annotations

import torch

from glm_rl.engine.batch import HostCopy, Row, SpecRow, emit_tokens
from glm_rl.engine.sampling import sampling_probs


def speculative_accept(
    p: torch.Tensor, q: torch.Tensor, drafts: list[int], generator: torch.Generator
) -> tuple[list[int], int]:
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


def accept(
    logits: torch.Tensor,
    rows: list[Row],
    active: list[int],
    drafts: list[list[int]],
    q: list[list[torch.Tensor | None]],
) -> tuple[list[list[int]], list[int], list[list[float]]]:
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
            tokens, a = speculative_accept(
                sampling_probs(logits[b], row.req.sampling), _stack(q[b]), drafts[b], row.generator
            )
        emitted.append(tokens)
        accepted.append(a)
    at_b, at_s, at_t = zip(*[(b, s, t) for b, tokens in enumerate(emitted) for s, t in enumerate(tokens)])
    flat = iter(logp[list(at_b), list(at_s), list(at_t)].tolist())
    return emitted, accepted, [[next(flat) for _ in tokens] for tokens in emitted]


def _accept_greedy(logits: torch.Tensor, drafts: list[list[int]]):
    """`accept` when every row is greedy: the emitted tokens are argmax p at positions 0..a (the kept drafts
    equal it), so the argmax and its logprob at every position cross to the host in one copy, before the host
    knows a."""
    best = logits.argmax(dim=-1)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, best[..., None]).squeeze(-1)
    emitted, accepted, logprobs = [], [], []
    for d, row in zip(drafts, HostCopy(best, logp).rows()):
        b, lp = row[: len(d) + 1], row[len(d) + 1 :]
        a = 0
        while a < len(d) and d[a] == b[a]:
            a += 1
        emitted.append([int(t) for t in b[: a + 1]])
        accepted.append(a)
        logprobs.append(lp[: a + 1])
    return emitted, accepted, logprobs


def _stack(q: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if not q or q[0] is None else torch.stack(q)


def record(row: SpecRow, tokens: list[int], a: int, logprobs: list[float], k: int) -> int:
    """Count one verify in the row's speculation counters and emit its tokens; returns how many were kept."""
    row.verify_ct, row.draft_tokens, row.accepted_tokens = (
        row.verify_ct + 1,
        row.draft_tokens + k,
        row.accepted_tokens + a,
    )
    return emit_tokens(row, tokens, logprobs)


def draft_row(logits: torch.Tensor, row: Row, best: int | None = None) -> tuple[int, torch.Tensor | None]:
    """One draft token from MTP logits [V] and the distribution it came from (None for greedy rows, whose
    draft is argmax(logits): `best` when the caller took it for the whole batch)."""
    sp = row.req.sampling
    if sp.temperature <= 0.0:
        return (int(torch.argmax(logits)) if best is None else best), None
    q = sampling_probs(logits[None], sp)[0]
    return int(torch.multinomial(q, 1, generator=row.generator)), q


def draft_all(
    logits: torch.Tensor,
    rows: list[Row],
    active: list[int],
    drafts: list[list[int]],
    q: list[list[torch.Tensor | None]],
) -> None:
    """Append one draft per active row (`draft_row`) from MTP logits [n, V]; greedy rows' argmax crosses to
    the host once for the batch."""
    greedy = any(rows[i].req.sampling.temperature <= 0.0 for i in active)
    best = logits.argmax(dim=-1).tolist() if greedy else [None] * len(active)
    for b, i in enumerate(active):
        token, dist = draft_row(logits[b].float(), rows[i], best[b])
        drafts[b].append(token)
        q[b].append(dist)
