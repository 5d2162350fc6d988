"""MTP speculative decoding over the static decoder's preallocated caches (`static.py`), CUDA-graphed on GPU.

The steps of `speculative.py` (verify, accept, draft; same `spec_rules`, same per-row generators, so the tokens,
logprobs, routed experts and counters are the DynamicCache path's — tests/test_engine_mtp.py checks both), with
the caches laid out slot == position: instead of masking rejected drafts' slots a later step simply rewrites
them; the MTP layer's cache holds the pair of main position t at slot t (chained drafts' slots are rewritten
the same way); finished rows are compacted out of both caches.

One draft with every row greedy (RL evaluation, `glm-rl generate --temperature 0`) takes a fused loop: each step
is the decoder's `verify_greedy` — verify, acceptance and the next draft in one graph — queued before the host
reads the previous step's tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from glm_rl.engine.batch import HostCopy, RoutedLog, SpecRow, survivors
from glm_rl.engine.decode.loop import step_rows
from glm_rl.engine.decode.spec_rules import accept, draft_all, record
from glm_rl.engine.decode.static import StaticDecoder


class StaticSpeculation:
    """The speculative loop over a StaticDecoder: live rows are cache rows 0..n-1 of both caches (compacted
    when rows finish). Main cache: token at position p in slot p. MTP cache: the pair (h_t, token t+1), HF
    position id t+1, in slot t. A verify writes slots start..start+k, the MTP forward after it slots
    start..start+a (+ chained drafts after that); whatever rejected drafts left there is rewritten before any
    query can see it, since queries see only slots <= their own."""

    fused_greedy = True  # one draft, greedy rows: `_run_greedy` (False: the general loop; tests compare the two)

    def __init__(self, decoder: StaticDecoder, rows: list[SpecRow], num_steps: int) -> None:
        self.decoder, self.rows, self.k = decoder, rows, num_steps
        self.active = list(range(len(rows)))
        self.want_routed = any(r.req.return_routed_experts for r in rows)
        self.routed = RoutedLog()  # the rows get their routed experts when the batch ends
        self.drafts: list[list[int]] = []
        self.q: list[list[torch.Tensor | None]] = []

    def run(self, pad_id: int, should_abort: Callable[[], bool]) -> list[SpecRow]:
        rows, dev, k = self.rows, self.decoder.device, self.k
        # verify positions reach prompt + max_new - 2 + k, chained MTP slots a further k - 1
        self.decoder.reserve(max(len(r.req.input_ids) + r.req.sampling.max_new_tokens for r in rows) + 2 * k)
        logits, hidden, routed = self.decoder.prefill_states([r.req.input_ids for r in rows], pad_id)
        lengths = [len(r.req.input_ids) for r in rows]
        if self.want_routed:
            self.routed.add(range(len(rows)), routed, counts=lengths)
        step_rows(rows, self.active, logits)
        keep = survivors(rows, self.active, should_abort)
        if not keep:
            return rows
        # MTP over the prompt: pairs (h_t, token t+1), the last one's token being the first sampled token
        width = hidden.shape[1]
        ids = [list(r.req.input_ids[1:]) + [r.output_ids[-1]] + [pad_id] * (width - n) for r, n in zip(rows, lengths)]
        self._select(keep, span=width)
        sel = torch.tensor(keep, device=dev)
        positions = torch.arange(1, width + 1, device=dev).expand(len(keep), width)
        mtp_logits, out = self.decoder.mtp_forward(
            hidden[sel], torch.tensor(ids, device=dev)[sel], positions, graph=False
        )  # one shape per prompt width: eager
        self._draft(mtp_logits, out, positions, torch.tensor([lengths[i] - 1 for i in self.active], device=dev))
        if self.fused_greedy and k == 1 and all(r.req.sampling.temperature <= 0.0 for r in rows):
            return self._run_greedy(should_abort)
        while True:
            hidden, next_ids, positions, accepted, starts, kept = self._verify()
            keep = survivors(rows, self.active, should_abort)
            if not keep:
                return rows
            if len(keep) < len(self.active):
                sel = torch.tensor(keep, device=dev)
                # main slots below each row's next verify start are written; MTP slots are behind them
                self._select(keep, span=max(starts[b] + kept[b] for b in keep) + 1)
                hidden, next_ids, positions, accepted = hidden[sel], next_ids[sel], positions[sel], accepted[sel]
                starts = [starts[b] for b in keep]
            # positions + 1 reach start + k + 1: known on the host, so nothing here waits for the GPU
            mtp_logits, out = self.decoder.mtp_forward(
                hidden, next_ids, positions + 1, max_position=max(starts) + k + 1
            )
            self._draft(mtp_logits, out, positions + 1, accepted)

    def _run_greedy(self, should_abort: Callable[[], bool]) -> list[SpecRow]:
        """The loop for one draft and greedy rows (RL evaluation, `glm-rl generate --temperature 0`): each step
        is the decoder's fused `verify_greedy` — verify, acceptance and the next draft in one graph, whose
        outputs include the next step's inputs — so the next step is queued before the host reads this one (one
        copy to the host per step; rows found finished drop what their queued step computed). The same tokens,
        logprobs and counters as the general loop."""
        rows = self.rows
        starts = [len(rows[i].req.input_ids) + len(rows[i].output_ids) - 1 for i in self.active]
        out = self.decoder.verify_greedy(
            [[rows[i].output_ids[-1], d[0]] for i, d in zip(self.active, self.drafts)], starts
        )
        while True:
            best, logp, draft, kept, next_ids, next_pos, routed = out
            # this step's results to the host (argmax at both positions, drafts kept, both logprobs; ids < 2^53
            # are exact in float64), copied before the queued step rewrites the graph's buffers
            fetched = HostCopy(best, kept, logp)
            part = self.routed.add(self.active, routed) if self.want_routed else None  # before the buffer is reused
            out = self.decoder.verify_greedy_queued(next_ids, next_pos, max(starts) + 2)  # a start grows <= 2
            counts = []
            for b, (i, (t0, t1, a, lp0, lp1)) in enumerate(zip(self.active, fetched.rows())):
                a = int(a)
                counts.append(record(rows[i], [int(t0), int(t1)][: a + 1], a, [lp0, lp1][: a + 1], 1))
                starts[b] += a + 1
            if part is not None:
                self.routed.set_counts(part, counts)
            keep = survivors(rows, self.active, should_abort)
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
            draft_all(logits, self.rows, self.active, self.drafts, self.q)
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
        rows, k = self.rows, self.k
        starts = [len(rows[i].req.input_ids) + len(rows[i].output_ids) - 1 for i in self.active]
        logits, hidden, routed = self.decoder.verify(
            [[rows[i].output_ids[-1], *d] for i, d in zip(self.active, self.drafts)], starts
        )
        emitted, accepted, logprobs = accept(logits, rows, self.active, self.drafts, self.q)
        next_ids, kept = [[0] * (k + 1) for _ in self.active], []
        for b, i in enumerate(self.active):
            kept.append(record(rows[i], emitted[b], accepted[b], logprobs[b], k))
            next_ids[b][: accepted[b] + 1] = emitted[b]
        if self.want_routed:
            self.routed.add(self.active, routed, counts=kept)
        n = len(starts)
        host = np.empty((n, 2 * (k + 1) + 1), dtype=np.int64)  # next ids | positions | accepted: one copy
        host[:, : k + 1] = next_ids
        host[:, k + 1 : -1] = np.asarray(starts)[:, None] + np.arange(k + 1)
        host[:, -1] = accepted
        packed = self.decoder.to_device(host)
        return (hidden, packed[:, : k + 1], packed[:, k + 1 : -1], packed[:, -1], starts, accepted)


@torch.no_grad()
def run_static_speculative(
    decoder: StaticDecoder, rows: list[SpecRow], *, num_steps: int, pad_id: int, should_abort: Callable[[], bool]
) -> list[SpecRow]:
    """Decode `rows` to the end with `num_steps` MTP drafts per verify, over the decoder's caches (built with
    the same MTP layer)."""
    spec = StaticSpeculation(decoder, rows, num_steps)
    spec.run(pad_id, should_abort)
    spec.routed.finish(rows)
    return rows
