"""What a reward function is asked about (`RewardRequest`), and how a returned reward is checked.

A request names its sample (`name`, the rollout's request id such as "s3-17") so that every failure can say which
sample it was about. The samples of one group share a prompt, so they share `prompt`, `label` and `metadata`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


class RewardError(RuntimeError):
    """A reward that could not be computed; the message names the sample(s)."""


@dataclass(frozen=True)
class RewardRequest:
    response: str
    label: str = ""
    metadata: dict = field(default_factory=dict)
    prompt: str | list = ""  # the row's prompt: text or chat messages (what a remote or custom RM may read)
    name: str = "?"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "prompt": self.prompt,
            "response": self.response,
            "label": self.label,
            "metadata": self.metadata,
        }


def group_json(group: list[RewardRequest]) -> dict[str, Any]:
    """One POST body for the samples of one prompt."""
    if not group:
        raise ValueError("empty reward group")
    first = group[0]
    if any(r.label != first.label or r.prompt != first.prompt for r in group):
        raise ValueError(f"group {describe(group)} mixes prompts or labels; a group is the samples of one prompt")
    return {
        "names": [r.name for r in group],
        "prompt": first.prompt,
        "responses": [r.response for r in group],
        "label": first.label,
        "metadata": first.metadata,
    }


def describe(group: list[RewardRequest]) -> str:
    names = [r.name for r in group]
    shown = ", ".join(names[:4]) + (f", … ({len(names)} in all)" if len(names) > 4 else "")
    return f"samples {shown}"


def as_reward(value: Any, what: str) -> float:
    """`value` as a float reward, or RewardError naming `what` (a bool, None, a string or NaN is not a reward)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RewardError(f"{what}: a reward must be a finite number, got {value!r}")
    return float(value)


def as_rewards(values: Any, group: list[RewardRequest], what: str) -> list[float]:
    if not isinstance(values, list | tuple) or len(values) != len(group):
        n = len(values) if isinstance(values, list | tuple) else type(values).__name__
        raise RewardError(f"{what}: expected a list of {len(group)} rewards, got {n!r}")
    return [as_reward(v, f"{what}, sample {r.name}") for v, r in zip(values, group)]
