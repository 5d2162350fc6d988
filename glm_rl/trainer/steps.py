"""The driver-side stages of one RL step that touch samples: advantages, old logprobs, corrections, train.

They run in the driver on whole batches (so MIS normalises over the batch and metrics are global) and hand
per-rank shards to the trainer group. Each takes the config section it reads (`algo`, or `train` for the
optimizer steps), not the run's whole config.
"""

from __future__ import annotations

import numpy as np
import torch

from glm_rl.algo import compute_advantages, gspo_token_weights, mis_weights, mismatch_metrics, tis_weights
from glm_rl.config import AlgoConfig, RoutingReplay, TrainConfig
from glm_rl.rollout.samples import Sample
from glm_rl.trainer.batching import response_loss_mask, split_for_dp


def assign_advantages(samples: list[Sample], algo: AlgoConfig, group_size: int) -> None:
    """Per-sample advantages over groups of `group_size` (--n-samples-per-prompt) contiguous samples."""
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    kw = {}
    if algo.advantage_estimator in ("grpo", "gspo"):
        kw["normalize_std"] = algo.normalize_advantage_std
    adv = compute_advantages(algo.advantage_estimator, rewards, group_size, **kw)
    for s, a in zip(samples, adv.tolist()):
        s.advantage = a


def old_logprobs_in_training(
    samples: list[Sample], algo: AlgoConfig, train_cfg: TrainConfig, dropout: float = 0.0
) -> bool:
    """Whether the training forward can stand in for the old-logprob pass (saving a forward over the batch): one
    optimizer step covers every sample, so the weights the old logprobs belong to are the ones training starts
    from, and nothing needs them before training — not MIS (it normalises over the whole batch first), not a
    KL reference (its own pass runs anyway), not R2 (it replays the routing that pass records). `dropout` (LoRA's):
    a training forward with dropout is not the eval-mode forward old logprobs come from."""
    one_step = (train_cfg.global_batch_size or len(samples)) >= len(samples)
    needs_pass = algo.recompute_old_logprobs or algo.enable_mis or algo.kl_loss_coef > 0 or dropout > 0
    return one_step and not needs_pass and not algo.use_rollout_logprobs and algo.routing_replay is not RoutingReplay.R2


def leave_old_logprobs_to_training(samples: list[Sample]) -> None:
    """`old_logprobs_in_training`'s form of `old_logprobs` + `corrections`: the loss takes the old logprobs,
    TIS weights and mismatch metrics from its own forward (`PolicyBackend.micro_batch_loss`); each sample's
    tokens in the loss are its generated ones."""
    for s in samples:
        s.old_logprobs = s.token_weights = None
        s.token_mask = response_loss_mask(s)


def old_logprobs(samples: list[Sample], algo: AlgoConfig, trainers) -> dict[str, float]:
    """Old logprobs per sample: recomputed by the trainer (default) or the engine's (--use-rollout-logprobs)."""
    metrics: dict[str, float] = {}
    if algo.use_rollout_logprobs and algo.kl_loss_coef == 0:
        for s in samples:
            s.old_logprobs = np.asarray(s.rollout_logprobs, dtype=np.float32)
        return metrics
    results = trainers.logprobs(split_for_dp(samples, trainers.dp_size))
    by_index = {s.index: s for s in samples}
    for res in results:
        for i, lp in res["old"].items():
            by_index[i].old_logprobs = lp
        for i, lp in res["ref"].items():
            by_index[i].ref_logprobs = lp
        for i, chosen in res["routing"].items():
            by_index[i].trainer_routing = chosen
    total = sum(r["replay_total"] for r in results)
    if algo.use_rollout_logprobs:
        for s in samples:
            s.old_logprobs = np.asarray(s.rollout_logprobs, dtype=np.float32)
    if total:
        metrics["routing/replay_agreement"] = sum(r["replay_agree"] for r in results) / total
    return metrics


def _padded(rows: list, width: int) -> torch.Tensor:
    """(len(rows), width): each row's per-response-token values, zero-padded on the right."""
    out = torch.zeros((len(rows), width))
    for i, values in enumerate(rows):
        out[i, : len(values)] = torch.tensor(np.asarray(values, dtype=np.float32))
    return out


def corrections(samples: list[Sample], a: AlgoConfig) -> dict[str, float]:
    """Train/rollout mismatch metrics, then TIS or MIS weights per response token (batch-level), in the form
    --gspo-token-weights asks for; generated tokens only (`Sample.loss_mask`): appended observations count in
    neither the metrics nor the loss."""
    width = max(len(s.response_ids) for s in samples)
    old = _padded([s.old_logprobs for s in samples], width)  # (B, T)
    rollout = _padded([s.rollout_logprobs for s in samples], width)  # (B, T)
    mask = torch.zeros_like(old)
    for i, s in enumerate(samples):
        mask[i, : len(s.response_ids)] = torch.from_numpy(response_loss_mask(s))
    weights, mask, metrics = correction_weights(old, rollout, mask, a)
    for i, s in enumerate(samples):
        n = len(s.response_ids)
        s.token_mask = mask[i, :n].numpy()
        s.token_weights = None if weights is None else weights[i, :n].numpy()
    return metrics


def correction_weights(
    old: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor, a: AlgoConfig
) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, float]]:
    """(TIS or MIS weights (B, T) in the --gspo-token-weights form, or None; the loss mask (MIS may drop tokens);
    mismatch + correction metrics) of (B, T) old / rollout logprobs: the whole batch's in `corrections`, one
    micro-batch's when the training forward gives the old logprobs (`PolicyBackend.micro_batch_loss`)."""
    metrics = mismatch_metrics(old, rollout, mask)
    weights = None
    if a.enable_mis:
        weights, mask, m = mis_weights(
            old,
            rollout,
            mask,
            truncate=a.mis_truncate,
            mask_low=a.mis_mask_low,
            mask_high=a.mis_mask_high,
            veto_threshold=a.mis_veto_threshold,
            normalization=a.mis_normalization,
        )
        metrics |= m
    elif a.use_tis:
        weights, m = tis_weights(old, rollout, mask, clip=a.tis_clip, clip_low=a.tis_clip_low)
        metrics |= m
    if weights is not None:  # "sequence-mean" needs --advantage-estimator gspo (AlgoConfig checks)
        weights = gspo_token_weights(weights, mask, a.gspo_token_weights)
    return weights, mask, metrics


def add_metric_sums(sums: dict[str, float], part: dict[str, float], weight: float = 1.0) -> None:
    """Accumulate token-weighted metrics into `sums` (value x `weight`); `*_max` metrics are maxima, kept as the
    largest seen. `metric_means` turns the sums back into means."""
    for k, v in part.items():
        sums[k] = max(sums.get(k, v), v) if k.endswith("_max") else sums.get(k, 0.0) + v * weight


def metric_means(sums: dict[str, float], tokens: float) -> dict[str, float]:
    return {k: v if k.endswith("_max") else v / tokens for k, v in sums.items()}


def train(samples: list[Sample], train_cfg: TrainConfig, trainers) -> dict[str, float]:
    """One optimizer step per global batch; loss normalised by the global batch's response-token count."""
    gbs = train_cfg.global_batch_size or len(samples)
    sums: dict[str, float] = {}
    tokens_total = 0.0
    grad_norms = []
    for start in range(0, len(samples), gbs):
        batch = samples[start : start + gbs]
        global_tokens = float(sum(s.token_mask.sum() for s in batch))
        if global_tokens == 0:  # e.g. MIS vetoed every sequence: skip the optimizer step
            continue
        results = trainers.train_step(split_for_dp(batch, trainers.dp_size), global_tokens)
        grad_norms.append(results[0]["train/grad_norm"])  # identical on every rank after the all-reduce
        for res in results:
            n = res["n_tokens"]
            add_metric_sums(sums, {k: v for k, v in res.items() if k not in ("n_tokens", "train/grad_norm")}, n)
            tokens_total += n
    metrics = metric_means(sums, max(tokens_total, 1.0))
    metrics["train/grad_norm"] = float(np.mean(grad_norms)) if grad_norms else 0.0
    metrics["train/optimizer_steps"] = float(len(grad_norms))
    metrics.setdefault("train/loss", metrics.get("train/pg_loss", 0.0))
    metrics["train/num_samples"] = float(len(samples))
    metrics["train/num_tokens"] = tokens_total
    return metrics
