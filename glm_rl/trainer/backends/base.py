"""The trainer backend contract (`TrainerBackend`), and the RL step both backends share (`PolicyBackend`).

`TrainerBackend` is what a trainer rank (trainer/group.py) calls; both backends satisfy it (tested). The step
itself — old-logprob recompute with routing replay, and the training step with the per-micro-batch loss
(`micro_batch_loss`) — lives in `PolicyBackend`: a backend differs in how it runs the model and reduces
gradients, not in what one step computes, so the torch backend (the numerical reference) and the Megatron
backend cannot drift apart. A subclass sets `model`, `ref_model` (or None), `replay` (`ReplayHooks`), `algo`,
`loss_cfg`, `opt` (with `step()`) and `device`, and implements the hooks at the end of `PolicyBackend`
(`_micro_batches`, `_zero_grads`, `_reduce_grads_and_clip`, and `_forward` unless it overrides the passes that
call it: `_forward_pass` for old / reference logprobs and `_train_pass` for forward + backward — the Megatron
backend runs both through megatron's pipeline schedule, where only the last stage sees logprobs — and `_count`
to sum replay agreement over ranks that split one sample's tokens or layers).

Which routing a pass replays follows `AlgoConfig.routing_replay` (`routing_source`): R3 the engine's choice in
every pass, R2 the trainer's own choice recorded in the old-logprob pass, replayed in training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist

from glm_rl.algo import policy_loss
from glm_rl.config.algo import AlgoConfig, RoutingReplay
from glm_rl.memory import HostOffload
from glm_rl.rollout.samples import Sample
from glm_rl.trainer.batching import MicroBatch, RoutingSource, warm_up_samples
from glm_rl.trainer.steps import add_metric_sums, correction_weights, metric_means

LossFn = Callable[[torch.Tensor, "torch.Tensor | None", MicroBatch], torch.Tensor]
Phase = Literal["logprob", "train"]


@runtime_checkable
class TrainerBackend(Protocol):
    """One trainer rank's model, optimizer and weight export, as a trainer rank (`TrainerActor`) drives it.
    Built from the model / train / algo sections plus its own (torch: `lora`, megatron: `megatron`)."""

    def dp_coords(self) -> tuple[int, bool]:
        """(data-parallel rank = the sample shard this rank trains on, whether this rank reports for it)."""
        ...

    def logprobs(self, samples: list[Sample]) -> dict[str, Any]:
        """{"old", "ref": {sample index: (response,) logprobs}, "routing": {index: (positions, n_moe, k)} (R2's
        record), "replay_agree", "replay_total": ints}; a rank that does not report returns empty dicts."""
        ...

    def train_step(self, samples: list[Sample], global_tokens: float) -> dict[str, float]:
        """One optimizer step on this DP rank's shard; token-mean metrics, "n_tokens", "train/grad_norm"."""
        ...

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) for every weight the engines load (a collective for sharded backends)."""
        ...

    def is_sync_source(self) -> bool:
        """Whether this rank sends `sync_tensors()` to the engines (`broadcast` / `tensor`: one rank per pipeline
        stage; `p2p` has every rank send its planned share of `named_tensors()`)."""
        ...

    def sync_tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) for what this rank's pipeline stage holds, possibly as a stream (a collective
        for sharded backends: every rank of the stage iterates it to the end, sender or not)."""
        ...

    def flatten_weights(self) -> tuple[torch.Tensor, list]:
        """(one buffer, layout) holding every engine weight, for the colocated `tensor` sync; a backend that
        cannot share one raises NotImplementedError (the config refuses that pairing at parse time)."""
        ...

    def save(self, path: Path) -> None: ...

    def load(self, path: Path) -> None: ...

    def offload(self) -> float:
        """Colocated on a GPU: free this rank's device memory (weights and optimizer state to pinned host memory,
        gradients dropped) for the engines; returns the GiB moved. `onload` brings it back, bitwise."""
        ...

    def onload(self) -> None: ...

    def is_offloaded(self) -> bool: ...

    def warm_up(self, tokens: int) -> None:
        """Pay the first step's one-off costs at startup (see `PolicyBackend.warm_up`); weights untouched."""
        ...


class ReplayHooks(Protocol):
    """The routing-replay state a backend installs on its routers (trainer/routing_replay.py, megatron/replay.py)."""

    mode: str
    num_moe_layers: int

    def record(self, valid: torch.Tensor) -> None: ...

    def replay(self, forced: torch.Tensor, valid: torch.Tensor) -> None: ...

    def off(self) -> None: ...

    def recorded(self) -> torch.Tensor: ...

    def take_agreement(self) -> tuple[int, int]: ...


def routed_experts(s: Sample) -> np.ndarray | None:
    """R3: the experts the rollout engine chose."""
    return s.routed_experts


def trainer_routing(s: Sample) -> np.ndarray | None:
    """R2: the trainer's own choice, recorded in the old-logprob pass."""
    return s.trainer_routing


def routing_source(replay: RoutingReplay, phase: Phase) -> RoutingSource | None:
    """The routing a `phase` pass replays under `replay`, or None (the pass routes with its own weights)."""
    match replay:
        case RoutingReplay.R3:
            return routed_experts
        case RoutingReplay.R2:
            return trainer_routing if phase == "train" else None
        case RoutingReplay.OFF:
            return None
        case _:
            raise ValueError(f"routing replay {replay!r} unknown")


class PolicyBackend:
    """The shared RL step; subclasses set the attributes below and implement the hooks at the end."""

    model: torch.nn.Module
    ref_model: torch.nn.Module | None
    replay: ReplayHooks
    algo: AlgoConfig
    device: str

    def _routing_source(self, phase: Phase) -> RoutingSource | None:
        return routing_source(self.algo.routing_replay, phase)

    def _set_replay(self, mb: MicroBatch, phase: Phase) -> None:
        """Replay the micro-batch's routing when it carries one; R2's old-logprob pass records instead."""
        if mb.routed_experts is not None:
            self.replay.replay(mb.routed_experts, mb.valid)
        elif self.algo.routing_replay is RoutingReplay.R2 and phase == "logprob":
            self.replay.record(mb.valid)
        else:
            self.replay.off()

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        opt = self.opt
        return [opt.opt if hasattr(opt, "opt") else opt]  # megatron: the AdamW inside its wrapper

    def _resident_tensors(self) -> list[torch.Tensor]:
        """Every device tensor this rank keeps between steps: weights (and their flat buffer), the reference
        model, optimizer state and fp32 master copies."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        if self.ref_model is not None:
            tensors += [*self.ref_model.parameters(), *self.ref_model.buffers()]
        if getattr(self, "flat", None) is not None:
            tensors.append(self.flat[0])
        tensors += getattr(self.opt, "master", None) or []
        for opt in self._optimizers():
            tensors += [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]
        return [t for t in tensors if t.device.type != "cpu"]

    def offload(self) -> float:
        if self.is_offloaded():  # a second offload would record the freed (empty) storages as the ones to restore
            return 0.0
        for opt in self._optimizers():
            opt.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)  # megatron's master copies keep no grads; the model's go too
        self._offloaded = HostOffload(self._resident_tensors())
        self._offloaded.release()
        return self._offloaded.nbytes / 2**30

    def onload(self) -> None:
        if self.is_offloaded():
            self._offloaded.restore()
        self._offloaded = None

    def is_offloaded(self) -> bool:
        return getattr(self, "_offloaded", None) is not None

    # (vocab size, MoE layers, routed experts, top-k) of the model, for `warm_up`'s synthetic samples; a backend
    # that leaves it None is not warmed up
    warm_up_shape: tuple[int, int, int, int] | None = None

    def warm_up(self, tokens: int) -> None:
        """One micro-batch of `tokens` synthetic positions through the old-logprob pass and a forward + backward
        of a zero loss, then the gradients are zeroed and the cache allocator's blocks freed: CUDA / cuBLAS
        initialisation and kernel selection happen at startup instead of in step 1 (issue 25: step 1 took 4x a
        steady step). Weights and optimizer state are untouched; with routing replay the samples carry random
        expert choices, as a rollout's would."""
        if self.warm_up_shape is None:
            return
        rollout_routing = self._routing_source("logprob") is not None  # R3: samples carry the engine's choices
        samples = warm_up_samples(tokens, *self.warm_up_shape, with_routing=rollout_routing)
        routing = self.logprobs(samples)["routing"]
        for s in samples:  # R2 replays in training what the old-logprob pass recorded
            s.trainer_routing = routing.get(s.index)
        zero_loss = lambda logp, entropy, mb: logp.sum() * 0.0  # noqa: E731 - gradients of zero, kernels all run
        self._train_pass(self._micro_batches(samples, "train"), zero_loss, with_entropy=False)
        self.replay.off()
        self._zero_grads()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # engines size their KV cache from the free memory after this

    def dp_coords(self) -> tuple[int, bool]:
        """(data-parallel rank = the sample shard this rank trains on, whether it reports for its DP rank).
        Plain data parallelism: every rank is its own DP rank and reports."""
        return (dist.get_rank() if dist.is_initialized() else 0), True

    def is_sync_source(self) -> bool:
        """Plain data parallelism: rank 0 holds a whole replica and sends it."""
        return not dist.is_initialized() or dist.get_rank() == 0

    def sync_tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        return self.named_tensors()

    def _count(self, agree: int, total: int) -> tuple[int, int]:
        return agree, total

    # -- driving micro-batches through the model (overridable) ---------------------------------------------------
    def _forward_pass(
        self, model, mbs: list[MicroBatch], phase: str | None
    ) -> list[tuple[torch.Tensor | None, np.ndarray | None]]:
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
    def micro_batch_loss(
        self, logp: torch.Tensor, entropy: torch.Tensor | None, mb: MicroBatch, global_tokens: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss to backpropagate, metric sums) of one micro-batch. The policy loss is scaled by the micro-batch's
        share of the global response tokens, so gradients summed over micro-batches and ranks are the global
        token mean's; metrics are token-weighted sums with "n_tokens" (`train_step` divides). A micro-batch
        without response tokens gives a zero loss that is still on the graph (a backward that takes part in
        collectives must run) and no metrics."""
        n_tokens = float(mb.loss_mask.sum())
        if n_tokens == 0:
            return logp.sum() * 0.0, {}
        old, weights, corrections = _to(mb.extra.get("old_logprobs"), self.device), None, {}
        if old is None:  # steps.old_logprobs_in_training: this forward's own logprobs are the old ones
            old, weights, corrections = self._corrections_from(logp, mb)
        loss, metrics = policy_loss(
            logp,
            old,
            mb.advantages.to(self.device),
            mb.loss_mask.to(self.device),
            self.loss_cfg,
            ref_logp=_to(mb.extra.get("ref_logprobs"), self.device),
            token_weights=weights if weights is not None else _to(mb.extra.get("token_weights"), self.device),
            entropy=entropy,
        )
        metrics["train/loss"] = float(loss.detach())
        sums: dict[str, float] = {}
        add_metric_sums(sums, metrics | corrections, n_tokens)
        sums["n_tokens"] = n_tokens
        return loss * (n_tokens / global_tokens), sums

    def _corrections_from(self, logp: torch.Tensor, mb: MicroBatch):
        """(old logprobs, TIS weights or None, metrics) when the old logprobs are this forward's, detached: what
        `steps.old_logprobs` + `steps.corrections` give otherwise (mismatch metrics, TIS weights in the
        --gspo-token-weights form), per micro-batch (TIS is per token; its metrics are token means)."""
        old, rollout, mask = logp.detach(), mb.rollout_logp.to(self.device), mb.loss_mask.to(self.device)
        weights, _, metrics = correction_weights(old, rollout, mask, self.algo)  # no MIS here: its mask stays
        return old, weights, metrics

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
                    routing[s.index] = recorded[i, : s.num_positions]
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
            add_metric_sums(sums, part)
            return loss

        self._train_pass(self._micro_batches(samples, "train"), loss_fn, with_entropy=self.algo.entropy_coef > 0)
        self.replay.off()
        grad_norm = self._reduce_grads_and_clip()
        self.opt.step()
        n = max(sums.pop("n_tokens", 0.0), 1.0)
        out = {**metric_means(sums, n), "n_tokens": n}
        out["train/grad_norm"] = grad_norm
        agree, total = self._count(*self.replay.take_agreement())
        if total:  # replayed routing vs the current weights' own choice (drifts with later optimizer steps)
            out["routing/train_replay_agreement"] = agree / total
        return out

    # -- hooks a backend implements ---------------------------------------------------------------------------------
    def _forward(self, model, mb: MicroBatch, with_entropy: bool = False):
        """(logp (B, T), entropy (B, T) | None) of `mb`'s targets (used by the default passes)."""
        raise NotImplementedError

    def _micro_batches(self, samples: list[Sample], phase: Phase) -> list[MicroBatch]:
        """Samples packed by --max-tokens-per-gpu, each micro-batch carrying `_routing_source(phase)`'s routing."""
        raise NotImplementedError

    def _zero_grads(self) -> None:
        raise NotImplementedError

    def _reduce_grads_and_clip(self) -> float:
        """Sum gradients over data-parallel ranks, clip by --clip-grad; the global grad norm."""
        raise NotImplementedError


def _to(x: torch.Tensor | None, device: str) -> torch.Tensor | None:
    return None if x is None else x.to(device)
