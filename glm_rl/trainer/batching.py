"""Split samples over data-parallel ranks and pack them into micro-batches by a token budget.

Loss normalisation is global: every rank scales its per-token loss by 1 / (response tokens in the whole
optimizer step), so summing gradients over ranks and micro-batches gives exactly the token-mean gradient of the
full batch, whatever the split (tested).

Multi-turn samples (`Sample.loss_mask`, glm_rl/rollout/agentic/) carry appended tool observations inside
`response_ids`: those positions stay in the sequence (the model reads them) but their `loss_mask` is 0, so the
loss, its token count and every per-token correction ignore them, exactly as if they were prompt-side context
(tested). Per-sample values (`MicroBatch.per_sample`) still cover every response position, one per response
token, observations included, so they line up with `response_ids`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from glm_rl.rollout.samples import Sample

# the routing a pass replays, read off each sample (trainer/backends/base.py: `routing_source`)
RoutingSource = Callable[[Sample], "np.ndarray | None"]


def split_for_dp(samples: list[Sample], world_size: int) -> list[list[Sample]]:
    """Greedy balance by token count (longest first onto the lightest rank); order kept within a rank."""
    shards: list[list[Sample]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for s in sorted(samples, key=lambda s: -s.num_positions):
        rank = loads.index(min(loads))
        shards[rank].append(s)
        loads[rank] += s.num_positions
    return [sorted(shard, key=lambda s: s.index) for shard in shards]


def pack_micro_batches(samples: list[Sample], max_tokens: int) -> list[list[Sample]]:
    """Micro-batches whose padded size (rows x longest row) stays within max_tokens."""
    batches: list[list[Sample]] = []
    current: list[Sample] = []
    longest = 0
    for s in sorted(samples, key=lambda s: s.num_positions):
        n = s.num_positions
        if n > max_tokens:
            raise ValueError(f"sample {s.index} has {n} positions, over --max-tokens-per-gpu {max_tokens}")
        if current and (len(current) + 1) * max(longest, n) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(s)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


@dataclass
class MicroBatch:
    samples: list[Sample]
    input_ids: torch.Tensor  # (B, T) tokens[:-1], right-padded
    targets: torch.Tensor  # (B, T) tokens[1:]
    valid: torch.Tensor  # (B, T) bool, real positions
    loss_mask: torch.Tensor  # (B, T) float, positions whose target is a generated response token
    rollout_logp: torch.Tensor  # (B, T) engine's logprobs on response targets, 0 elsewhere
    advantages: torch.Tensor  # (B, T) sample advantage on response targets
    routed_experts: torch.Tensor | None  # (B, T, n_moe, k) the routing to replay (R3 / R2), or None
    extra: dict[str, torch.Tensor]  # (B, T) old_logprobs / ref_logprobs / token_weights when set

    def per_sample(self, x: torch.Tensor) -> list[np.ndarray]:
        """Split a (B, T) tensor back into each sample's response-target values (one per response token,
        masked observation tokens included)."""
        return [
            x[i, len(s.prompt_ids) - 1 : s.num_positions].detach().cpu().numpy() for i, s in enumerate(self.samples)
        ]


def response_loss_mask(s: Sample) -> np.ndarray:
    """(len(response_ids),) float32: 1 on generated tokens, 0 on appended observations (`Sample.loss_mask`)."""
    n = len(s.response_ids)
    if s.loss_mask is None:
        return np.ones(n, dtype=np.float32)
    if len(s.loss_mask) != n:
        raise ValueError(f"sample {s.index}: loss_mask has {len(s.loss_mask)} entries, response_ids {n}")
    return np.asarray(s.loss_mask, dtype=np.float32)


def collate(samples: list[Sample], pad_id: int, routing: RoutingSource | None = None) -> MicroBatch:
    """Pad samples into a MicroBatch; `routing` reads the routing to replay off a sample (the engine's for R3,
    the trainer's recorded one for R2), or None."""
    T = max(s.num_positions for s in samples)
    B = len(samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), pad_id, dtype=torch.long)
    valid = torch.zeros((B, T), dtype=torch.bool)
    loss_mask = torch.zeros((B, T))
    rollout_logp = torch.zeros((B, T))
    advantages = torch.zeros((B, T))
    routed = None
    for i, s in enumerate(samples):
        tokens = torch.tensor(s.tokens)
        n, p = s.num_positions, len(s.prompt_ids)
        input_ids[i, :n], targets[i, :n], valid[i, :n] = tokens[:-1], tokens[1:], True
        loss_mask[i, p - 1 : n] = torch.from_numpy(response_loss_mask(s))
        rollout_logp[i, p - 1 : n] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
        advantages[i, p - 1 : n] = s.advantage
        if routing:
            chosen = routing(s)
            if chosen is None or chosen.shape[0] != n:
                got = None if chosen is None else chosen.shape
                raise ValueError(f"sample {s.index}: {routing.__name__} {got}, expected {n} positions")
            if routed is None:
                routed = torch.zeros((B, T, *chosen.shape[1:]), dtype=torch.long)
                routed[:] = torch.arange(routed.shape[-1])  # pad rows: any valid distinct experts
            routed[i, :n] = torch.from_numpy(chosen.astype(np.int64))
    extra = {}
    for name in ("old_logprobs", "ref_logprobs", "token_weights", "token_mask"):
        if getattr(samples[0], name) is not None:
            extra[name] = torch.zeros((B, T))
            for i, s in enumerate(samples):
                p = len(s.prompt_ids)
                extra[name][i, p - 1 : s.num_positions] = torch.tensor(np.asarray(getattr(s, name), dtype=np.float32))
    if "token_mask" in extra:
        loss_mask = loss_mask * extra.pop("token_mask")
    return MicroBatch(samples, input_ids, targets, valid, loss_mask, rollout_logp, advantages, routed, extra)


def warm_up_samples(
    tokens: int, vocab: int, moe_layers: int, experts: int, top_k: int, *, with_routing: bool, length: int = 256
) -> list[Sample]:
    """Synthetic samples filling `tokens` positions (`length` tokens each, a quarter of them prompt) of random
    token ids, for a backend's warm-up; `with_routing`: each carries distinct random experts per position and MoE
    layer (what R3 replays)."""
    rng = np.random.default_rng(0)
    length = max(2, min(length, tokens))
    samples = []
    for i in range(max(1, tokens // length)):
        ids = rng.integers(0, vocab, length).tolist()
        prompt = max(1, length // 4)
        routed = None
        if with_routing:
            routed = np.argsort(rng.random((length - 1, moe_layers, experts)), axis=-1)[..., :top_k].astype(np.int16)
        samples.append(Sample(i, i, ids[:prompt], ids[prompt:], [0.0] * (length - prompt), routed_experts=routed))
    return samples
