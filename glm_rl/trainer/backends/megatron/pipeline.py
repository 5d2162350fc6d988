"""Run micro-batches through megatron-core's own pipeline schedule, forward-only or forward + backward.

One entry point, `run_micro_batches(model, mbs, forward, loss, forward_only=...)`: the RL backend uses it for
the old-logprob pass (forward only; logprobs collected on the last stage) and for training (the policy loss
computed and backpropagated on the last stage). Choices, and why:
- The schedule is `megatron.core.pipeline_parallel.get_forward_backward_func()`: 1F1B without interleaving
  when PP > 1 (one model chunk per stage), megatron's plain loop when PP == 1 — one code path for both.
- Micro-batches differ in rows and length (packed by a token budget), so the model config must have
  `variable_seq_lengths=True` (`PIPELINE_CONFIG`): neighbouring stages exchange each tensor's shape first.
- `batch_p2p_comm` stays at megatron's default (batched isend / irecv): it works over gloo (the PP tests run
  it) as over NCCL.
- Loss scaling: the caller's loss is already what must be backpropagated (its share of the global tokens).
  Megatron divides a loss function's first output by the token count it returns (we return 1) and by the
  number of micro-batches; the loss is multiplied by that number first, so the gradient is the caller's.
  (`calculate_per_token_loss` would skip the division but also changes how megatron normalises the MTP loss.)
- Only the last stage runs `loss`; in 1F1B its backward follows each forward directly, so
  per-micro-batch state set in `loss` (e.g. the MTP loss scale) is still current when that backward runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from glm_rl.trainer.batching import MicroBatch

PIPELINE_CONFIG = dict(variable_seq_lengths=True)  # TransformerConfig fields the schedule needs (see above)


def run_micro_batches(
    model,
    mbs: list[MicroBatch],
    forward: Callable[[MicroBatch], torch.Tensor],
    loss: Callable[[MicroBatch, torch.Tensor], tuple[torch.Tensor, Any]],
    *,
    forward_only: bool,
) -> list[Any]:
    """Run `mbs` through this rank's stage. `forward(mb)` runs the stage's model on `mb` (the schedule has set
    the stage's input tensor from the previous stage); on the last stage `loss(mb, output)` returns (loss to
    backpropagate, a result to keep). Returns the kept results in micro-batch order on the last stage, [] on
    the others. Collective over the pipeline group: every stage must pass the same micro-batches."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if ps.get_pipeline_model_parallel_world_size() > 1 and not model.config.variable_seq_lengths:
        raise ValueError(
            "pipeline parallelism over micro-batches of different lengths needs the model built "
            "with variable_seq_lengths=True (pipeline.PIPELINE_CONFIG)"
        )
    if not mbs:
        return []
    n = len(mbs)
    results: list[Any] = []

    def step(data_iterator, stage_model):
        mb = next(data_iterator)
        output = forward(mb)

        def loss_func(output_tensor):
            value, kept = loss(mb, output_tensor)
            results.append(kept)
            # megatron divides by the token count returned (1) and by n: the gradient stays `value`'s
            return value * n, torch.ones((), dtype=torch.int), {}

        return output, loss_func

    get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter(mbs),
        model=model,
        num_microbatches=n,
        seq_length=max(mb.input_ids.shape[1] for mb in mbs),  # unused with variable_seq_lengths
        micro_batch_size=max(mb.input_ids.shape[0] for mb in mbs),
        forward_only=forward_only,
    )
    return results
