"""Rewards: rule graders by name, remote reward models, custom functions, and the reward server.

- `get_reward_fn(name)`: the sync rule grader `(response, label, metadata=None) -> float` (rule.py).
- `build_rewarder(...)`: one async object over every kind (rule, remote_rm, custom), per sample or per group
  (hub.py); this is what the rollout manager calls.
- `serve(...)` / `python -m glm_rl.rollout.rewards.server`: an HTTP reward server (server.py).
"""

from glm_rl.rollout.rewards.hub import Rewarder, RewardError, RewardRequest, build_rewarder, reward_option_errors
from glm_rl.rollout.rewards.math_grader import extract_math_answer, math_equal
from glm_rl.rollout.rewards.remote import RemoteRewardClient, RemoteRewardError
from glm_rl.rollout.rewards.rule import (
    REWARDS,
    RewardFn,
    arithmetic_reward,
    f1_score,
    get_reward_fn,
    is_rule,
    parse_arithmetic_answer,
)

__all__ = [
    "REWARDS",
    "RemoteRewardClient",
    "RemoteRewardError",
    "RewardError",
    "RewardFn",
    "RewardRequest",
    "Rewarder",
    "arithmetic_reward",
    "build_rewarder",
    "extract_math_answer",
    "f1_score",
    "get_reward_fn",
    "is_rule",
    "math_equal",
    "parse_arithmetic_answer",
    "reward_option_errors",
]
