"""The RL step both trainer backends share: old-logprob recompute with routing replay, and the training step.

A backend differs in how it runs the model and reduces gradients, not in what one step computes; keeping the
step here means the torch backend (the numerical reference) and the Megatron backend cannot drift apart.
A subclass sets `model`, `ref_model` (or None), `replay` (R2 / R3: `record`, `replay`, `off`, `mode`,
`recorded`, `take_agreement`), `algo`, `loss_cfg`, `opt` (with `step()`), `device`, and implements:

    _forward(model, mb, with_entropy) -> (logp (B, T), entropy (B, T) | None)
    _micro_batches(samples, phase)     -> list[MicroBatch]   (phase: "logprob" | "train")
    _zero_grads()
    _reduce_grads_and_clip()           -> grad norm (after the data-parallel reduction)

and may override `_count` (sum replay agreement over ranks that split one sample's tokens),
`_on_empty_batch` (a micro-batch without response tokens: the Megatron backend still runs its backward, since
its expert all-to-alls are collectives) and `_before_backward` (told the micro-batch's share of the global
tokens; the Megatron backend scales its MTP loss by it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from glm_rl.algo import policy_loss
from glm_rl.rollout.samples import Sample
from glm_rl.trainer.batching import MicroBatch


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

    def _on_empty_batch(self, logp: torch.Tensor) -> None:
        pass

    def _before_backward(self, share: float) -> None:
        pass

    @torch.no_grad()
    def logprobs(self, samples: list[Sample]) -> dict:
        """Old (and reference) logprobs per sample; R2 returns the recorded routing; R3 reports agreement."""
        self.model.eval()
        self.replay.take_agreement()  # start counting afresh
        old, ref, routing = {}, {}, {}
        for mb in self._micro_batches(samples, "logprob"):
            self._set_replay(mb, "logprob")
            logp, _ = self._forward(self.model, mb)
            if self.replay.mode == "record":
                recorded = self.replay.recorded().to(torch.int16).cpu().numpy()
                for i, s in enumerate(mb.samples):
                    routing[s.index] = recorded[i, :s.num_positions]
            for s, lp in zip(mb.samples, mb.per_sample(logp)):
                old[s.index] = lp
            if self.ref_model is not None:
                for s, lp in zip(mb.samples, mb.per_sample(self._forward(self.ref_model, mb)[0])):
                    ref[s.index] = lp
        self.replay.off()
        agree, total = self._count(*self.replay.take_agreement())
        self.model.train()
        return {"old": old, "ref": ref, "routing": routing, "replay_agree": agree, "replay_total": total}

    def train_step(self, samples: list[Sample], global_tokens: int) -> dict[str, float]:
        """One optimizer step over this data-parallel rank's share of the global batch; each micro-batch's loss
        is scaled by its share of the global response tokens, so the reduced gradient is the global mean's."""
        self._zero_grads()
        sums: dict[str, float] = {}
        for mb in self._micro_batches(samples, "train"):
            self._set_replay(mb, "train")
            logp, entropy = self._forward(self.model, mb, with_entropy=self.algo.entropy_coef > 0)
            n_tokens = float(mb.loss_mask.sum())
            self._before_backward(n_tokens / global_tokens)
            if n_tokens == 0:
                self._on_empty_batch(logp)
                continue
            loss, metrics = policy_loss(
                logp, mb.extra["old_logprobs"].to(self.device), mb.advantages.to(self.device),
                mb.loss_mask.to(self.device), self.loss_cfg, ref_logp=_to(mb.extra.get("ref_logprobs"), self.device),
                token_weights=_to(mb.extra.get("token_weights"), self.device), entropy=entropy)
            (loss * (n_tokens / global_tokens)).backward()
            metrics["train/loss"] = float(loss.detach())
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * n_tokens
            sums["n_tokens"] = sums.get("n_tokens", 0.0) + n_tokens
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
