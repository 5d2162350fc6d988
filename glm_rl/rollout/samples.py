"""A rollout sample: what the engine produced for one prompt, plus what the driver adds (reward, advantage)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Sample:
    index: int  # position in the rollout batch (groups are contiguous)
    group: int  # prompt index within the rollout batch
    prompt_ids: list[int]
    response_ids: list[int]  # includes the stop token when the engine stopped on one
    rollout_logprobs: list[float]  # engine's logprob of each response token
    reward: float = 0.0
    advantage: float = 0.0
    finish_reason: str = "stop"
    weight_version: int = 0  # the oldest weight version among the response tokens
    # per response token, the weight version that generated it (None: all `weight_version`); differs within a
    # sample only when a partial rollout continued under new weights (--partial-rollout)
    token_versions: list[int] | None = None
    routed_experts: np.ndarray | None = None  # (len(tokens) - 1, n_moe_layers, top_k), engine's choice (R3)
    # what the prompt row carried (the reward function and custom generate functions read them)
    label: str | None = None
    metadata: dict | None = None
    tools: list | None = None
    # multi-turn: 1 on response tokens the model generated, 0 on appended tool observations (None: all 1);
    # rollout_logprobs holds 0.0 at masked positions
    loss_mask: list[int] | None = None
    response_text: str | None = None  # what the reward grades (None: the decoded response_ids)
    # set by the driver between the old-logprob pass and training (one value per response token)
    old_logprobs: np.ndarray | None = None
    trainer_routing: np.ndarray | None = None  # R2: the trainer's own choice in the old-logprob pass
    ref_logprobs: np.ndarray | None = None
    token_weights: np.ndarray | None = None  # TIS / MIS weights
    token_mask: np.ndarray | None = None  # MIS may drop tokens from the loss

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    def staleness(self, trainer_version: int) -> int:
        """How many weight versions the sample's oldest token lags `trainer_version`."""
        return trainer_version - self.weight_version

    @property
    def num_positions(self) -> int:
        """Positions the trainer runs (inputs are tokens[:-1]; targets tokens[1:])."""
        return len(self.prompt_ids) + len(self.response_ids) - 1
