"""Rule-based rewards, looked up by name (`--rm-type`).

`arithmetic`: the shipped tiny task. A response restates the problem and ends with the result, e.g.
"123+456=579"; the reward is 1.0 when the integer after the last "=" equals the label, else 0.0. A response
with no parsable integer there (malformed) also scores 0.0; `parse_arithmetic_answer` tells the cases apart.
"""

from __future__ import annotations

import re
from typing import Callable

_ANSWER = re.compile(r"=\s*(-?\d+)\s*$")

RewardFn = Callable[[str, str], float]


def parse_arithmetic_answer(response: str) -> int | None:
    """The integer after the last '=' at the end of the response, or None when malformed."""
    match = _ANSWER.search(response.strip())
    return int(match.group(1)) if match else None


def arithmetic_reward(response: str, label: str) -> float:
    answer = parse_arithmetic_answer(response)
    return float(answer is not None and answer == int(label))


REWARDS: dict[str, RewardFn] = {"arithmetic": arithmetic_reward}


def get_reward_fn(name: str) -> RewardFn:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; valid rewards: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]
