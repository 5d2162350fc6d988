"""Dynamic-sampling filters (DAPO): which groups a rollout step keeps (`--dynamic-sampling-filter-path`).

A filter is `fn(rollout_config, samples) -> bool` (slime's signature): `samples` are the rewarded samples of one
prompt, True keeps the group. Built in: `check_reward_nonzero_std`, DAPO's rule — a group whose rewards are all
equal has zero advantage everywhere and teaches nothing. The flag takes a dotted path or a built-in's short name.
Anything but a bool (numpy's included) from a filter is an error naming the filter and the group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from glm_rl.config.rollout import BUILTIN_FILTERS
from glm_rl.rollout.rewards.custom import load_function
from glm_rl.rollout.samples import Sample

FilterFn = Callable[[Any, list[Sample]], Any]
FLAG = "--dynamic-sampling-filter-path"


class FilterError(RuntimeError):
    """A filter that did not answer with a bool; the message names the filter and the group."""


def check_reward_nonzero_std(cfg: Any, samples: list[Sample]) -> bool:
    """Keep a group whose rewards are not all equal (nonzero standard deviation)."""
    rewards = [s.reward for s in samples]
    return len(rewards) > 1 and max(rewards) > min(rewards)


def load_filter(path: str) -> FilterFn:
    if path in BUILTIN_FILTERS:
        return globals()[path]
    return load_function(path, FLAG)


def keep_group(fn: FilterFn, path: str, cfg: Any, samples: list[Sample]) -> bool:
    """`fn`'s verdict on one group, checked to be a bool."""
    verdict = fn(cfg, samples)
    if isinstance(verdict, bool | np.bool_):
        return bool(verdict)
    names = ", ".join(f"s{s.index}" for s in samples[:4])
    raise FilterError(
        f"{FLAG} {path} returned {type(verdict).__name__} {verdict!r:.80} for the group of samples "
        f"{names} (group {samples[0].group if samples else '?'}); a filter must return a bool"
    )
