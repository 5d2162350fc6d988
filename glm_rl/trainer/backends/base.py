"""The RL step both trainer backends share: old-logprob recompute with routing replay, and the training step.

A backend differs in how it runs the model and reduces gradients, not in what one step computes; keeping the
step (and the per-micro-batch loss, `micro_batch_loss`) here means the torch backend (the numerical reference)
and the Megatron backend cannot drift apart. A subclass sets `model`, `ref_model` (or None), `replay` (R2 / R3:
`record`, `replay`, `off`, `mode`, `recorded`, `take_agreement`), `algo`, `loss_cfg`, `opt` (with `step()`),
`device`, and implements:

    _forward(model, mb, with_entropy) -> (logp (B, T), entropy (B, T) | None)
    _micro_batches(samples, phase)     -> list[MicroBatch]   (phase: "logprob" | "train")
    _zero_grads()
    _reduce_grads_and_clip()           -> grad norm (after the data-parallel reduction)

It may instead override how micro-batches are driven through the model — `_forward_pass` (old / reference
logprobs) and `_train_pass` (forward + backward of `micro_batch_loss`); the Megatron backend runs both through
megatron's pipeline schedule, where only the last stage sees logprobs — and `_count` (sum replay agreement over
ranks that split one sample's tokens or layers).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from glm_rl.algo import policy_loss
from glm_rl.rollout.samples import Sample
from glm_rl.trainer.batching import MicroBatch

LossFn = Callable[[torch.Tensor, "torch.Tensor | None", MicroBatch], torch.Tensor]


class PolicyBackend:
    def _routing_field(self, phase: str) -> str | None:
        """Which sample field holds the routing to replay: the engine's (R3) or, when training, R2's record."""
        if self.algo.use_rollout_routing_replay:
            return "routed_experts"
        if self.algo.use_routing_replay and phase == "train":
            return "trainer_routing"
        return None

    def _set_replay(self, mb: MicroBatch, phase: str) -> None:
        if mb.routed_experts is not None:
            self.replay.replay(mb.routed_experts, mb.valid)
        elif self.algo.use_routing_replay and phase == "logprob":
            self.replay.record(mb.valid)
        else:
            self.replay.off()

    def dp_coords(self) -> tuple[int, bool]:
        """(data-parallel rank = the sample shard this rank trains on, whether it reports for its DP rank).
        Plain data parallelism: every rank is its own DP rank and reports."""
        return (dist.get_rank() if dist.is_initialized() else 0), True

    def _count(self, agree: int, total: int) -> tuple[int, int]:
        return agree, total

    # -- driving micro-batches through the model (overridable) ---------------------------------------------------
    def _forward_pass(self, model, mbs: list[MicroBatch],
                      phase: str | None) -> list[tuple[torch.Tensor | None, np.ndarray | None]]:
        """Per micro-batch: (logp (B, T) or None where this rank has none, R2's recorded routing (B, T, n_moe, k)
        or None). `phase` None: no routing replay (the reference model)."""
        out = []
        for mb in mbs:
            if phase is not None:
                self._set_replay(mb, phase)
            logp, _ = self._forward(model, mb)
            recorded = self.replay.recorded() if phase is not None and self.replay.mode == "record" else None
            out.append((logp, None if recorded is None else recorded.to(torch.int16).cpu().numpy()))
        return out

    def _train_pass(self, mbs: list[MicroBatch], loss_fn: LossFn, with_entropy: bool) -> None:
        """Forward every micro-batch with its routing replayed, backward of `loss_fn(logp, entropy, mb)`."""
        for mb in mbs:
            self._set_replay(mb, "train")
            logp, entropy = self._forward(self.model, mb, with_entropy=with_entropy)
            loss = loss_fn(logp, entropy, mb)
            if mb.loss_mask.sum() > 0:
                loss.backward()

    # -- the shared step -----------------------------------------------------------------------------------------
    def micro_batch_loss(self, logp: torch.Tensor, entropy: torch.Tensor | None, mb: MicroBatch,
                         global_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss to backpropagate, metric sums) of one micro-batch. The policy loss is scaled by the micro-batch's
        share of the global response tokens, so gradients summed over micro-batches and ranks are the global
        token mean's; metrics are token-weighted sums with "n_tokens" (`train_step` divides). A micro-batch
        without response tokens gives a zero loss that is still on the graph (a backward that takes part in
        collectives must run) and no metrics."""
        n_tokens = float(mb.loss_mask.sum())
        if n_tokens == 0:
            return logp.sum() * 0.0, {}
        loss, metrics = policy_loss(
            logp, mb.extra["old_logprobs"].to(self.device), mb.advantages.to(self.device),
            mb.loss_mask.to(self.device), self.loss_cfg, ref_logp=_to(mb.extra.get("ref_logprobs"), self.device),
            token_weights=_to(mb.extra.get("token_weights"), self.device), entropy=entropy)
        metrics["train/loss"] = float(loss.detach())
        sums = {k: v * n_tokens for k, v in metrics.items()}
        sums["n_tokens"] = n_tokens
        return loss * (n_tokens / global_tokens), sums

    @torch.no_grad()
    def logprobs(self, samples: list[Sample]) -> dict:
        """Old (and reference) logprobs per sample; R2 returns the recorded routing; R3 reports agreement.
        A rank without logprobs (a Megatron pipeline stage before the last) returns empty dicts."""
        self.model.eval()
        self.replay.take_agreement()  # start counting afresh
        old, ref, routing = {}, {}, {}
        mbs = self._micro_batches(samples, "logprob")
        for mb, (logp, recorded) in zip(mbs, self._forward_pass(self.model, mbs, "logprob")):
            if recorded is not None:
                for i, s in enumerate(mb.samples):
                    routing[s.index] = recorded[i, :s.num_positions]
            if logp is not None:
                for s, lp in zip(mb.samples, mb.per_sample(logp)):
                    old[s.index] = lp
        self.replay.off()
        if self.ref_model is not None:
            for mb, (logp, _) in zip(mbs, self._forward_pass(self.ref_model, mbs, None)):
                if logp is not None:
                    for s, lp in zip(mb.samples, mb.per_sample(logp)):
                        ref[s.index] = lp
        agree, total = self._count(*self.replay.take_agreement())
        self.model.train()
        return {"old": old, "ref": ref, "routing": routing, "replay_agree": agree, "replay_total": total}

    def train_step(self, samples: list[Sample], global_tokens: int) -> dict[str, float]:
        """One optimizer step over this data-parallel rank's share of the global batch (`micro_batch_loss`)."""
        self._zero_grads()
        sums: dict[str, float] = {}

        def loss_fn(logp: torch.Tensor, entropy: torch.Tensor | None, mb: MicroBatch) -> torch.Tensor:
            loss, part = self.micro_batch_loss(logp, entropy, mb, global_tokens)
            for k, v in part.items():
                sums[k] = sums.get(k, 0.0) + v
            return loss

        self._train_pass(self._micro_batches(samples, "train"), loss_fn, with_entropy=self.algo.entropy_coef > 0)
        self.replay.off()
        grad_norm = self._reduce_grads_and_clip()
        self.opt.step()
        n = max(sums.pop("n_tokens", 0.0), 1.0)
        out = {**{k: v / n for k, v in sums.items()}, "n_tokens": n, "train/grad_norm": grad_norm}
        agree, total = self._count(*self.replay.take_agreement())
        if total:  # replayed routing vs the current weights' own choice (drifts with later optimizer steps)
            out["routing/train_replay_agreement"] = agree / total
        return out


def _to(x: torch.Tensor | None, device: str) -> torch.Tensor | None:
    return None if x is None else x.to(device)
