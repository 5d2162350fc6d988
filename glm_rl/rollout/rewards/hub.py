"""One async interface over every reward kind, chosen by plain arguments (the CLI maps its flags onto them).

    rewarder = build_rewarder(rm_type, rm_url=..., custom_rm_path=..., group_rm=...)
    rewards = await rewarder.score_group(requests)   # the samples of one prompt -> one reward each
    reward = await rewarder.score(request)           # a single sample

Precedence, as in slime: `custom_rm_path` wins over `rm_type`; `rm_type == "remote_rm"` needs `rm_url`;
anything else is a rule grader (rule.py). Rule graders and sync custom functions run on worker threads, so a
slow sympy comparison never blocks the event loop that is also streaming generations.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from glm_rl.rollout.rewards import custom
from glm_rl.rollout.rewards.math_grader import DEFAULT_TIMEOUT_S
from glm_rl.rollout.rewards.remote import RemoteRewardClient
from glm_rl.rollout.rewards.request import RewardError, RewardRequest, as_reward, as_rewards, describe
from glm_rl.rollout.rewards.rule import get_reward_fn, is_rule, unknown_rm_type_message

__all__ = ["RewardError", "RewardRequest", "Rewarder", "build_rewarder", "reward_option_errors"]


class Rewarder(Protocol):
    group: bool  # True: the unit is a group (--group-rm); score() then scores a group of one

    async def score(self, request: RewardRequest) -> float: ...

    async def score_group(self, group: list[RewardRequest]) -> list[float]: ...

    async def close(self) -> None: ...


class RuleRewarder:
    group = False

    def __init__(self, fn: Callable[..., float], name: str) -> None:
        self.fn, self.name = fn, name

    async def score(self, request: RewardRequest) -> float:
        value = await asyncio.to_thread(self.fn, request.response, request.label, request.metadata)
        return as_reward(value, f"sample {request.name} ({self.name})")

    async def score_group(self, group: list[RewardRequest]) -> list[float]:
        return list(await asyncio.gather(*(self.score(r) for r in group)))

    async def close(self) -> None:
        pass


class CustomRewarder:
    def __init__(self, fn: Callable[..., Any], path: str, group: bool) -> None:
        self.fn, self.path, self.group = fn, path, group
        self.with_prompt = custom.accepts_prompt(fn)

    async def score(self, request: RewardRequest) -> float:
        if self.group:
            return (await self.score_group([request]))[0]
        what = f"sample {request.name} ({self.path})"
        extra = {"prompt": request.prompt} if self.with_prompt else {}
        value = await self._call(what, request.response, request.label, request.metadata, **extra)
        return as_reward(value, what)

    async def score_group(self, group: list[RewardRequest]) -> list[float]:
        if not self.group:
            return list(await asyncio.gather(*(self.score(r) for r in group)))
        what, first = f"{describe(group)} ({self.path})", group[0]
        extra = {"prompt": first.prompt} if self.with_prompt else {}
        values = await self._call(what, [r.response for r in group], first.label, first.metadata, **extra)
        return as_rewards(values, group, what)

    async def _call(self, what: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await custom.call(self.fn, *args, **kwargs)
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"{what} raised {e!r}") from e

    async def close(self) -> None:
        pass


def reward_option_errors(
    rm_type: str, *, rm_url: str | None = None, custom_rm_path: str | None = None, group_rm: bool = False
) -> list[str]:
    """Every problem with these reward options, each naming the flag and value (empty when usable)."""
    if custom_rm_path:
        try:
            custom.load_function(custom_rm_path)
        except custom.CustomRewardError as e:
            return [str(e)]
        return []
    errors = []
    if rm_type == "remote_rm":
        if not rm_url:
            errors.append("--rm-type remote_rm needs --rm-url")
        elif not rm_url.startswith(("http://", "https://")):
            errors.append(f"--rm-url {rm_url!r}: expected an http:// or https:// URL")
    elif not is_rule(rm_type):
        errors.append(unknown_rm_type_message(rm_type))
    else:
        if rm_url:
            errors.append(f"--rm-url {rm_url!r} is only read with --rm-type remote_rm (got {rm_type!r})")
        if group_rm:
            errors.append(
                f"--group-rm needs --rm-type remote_rm or --custom-rm-path; {rm_type!r} grades samples one by one"
            )
    return errors


def build_rewarder(
    rm_type: str = "arithmetic",
    *,
    rm_url: str | None = None,
    custom_rm_path: str | None = None,
    group_rm: bool = False,
    reward_key: str = "reward",
    max_concurrency: int = 64,
    timeout_s: float = 30.0,
    max_retries: int = 3,
    math_timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Rewarder:
    """The rewarder for these options (ValueError listing every problem first). `reward_key`, `max_concurrency`,
    `timeout_s` and `max_retries` are the remote client's; `math_timeout_s` bounds one math comparison."""
    errors = reward_option_errors(rm_type, rm_url=rm_url, custom_rm_path=custom_rm_path, group_rm=group_rm)
    if errors:
        raise ValueError("; ".join(errors))
    if custom_rm_path:
        return CustomRewarder(custom.load_function(custom_rm_path), custom_rm_path, group_rm)
    if rm_type == "remote_rm":
        return RemoteRewardClient(
            rm_url,
            group=group_rm,
            reward_key=reward_key,
            max_concurrency=max_concurrency,
            timeout_s=timeout_s,
            max_retries=max_retries,
        )
    return RuleRewarder(get_reward_fn(rm_type, math_timeout_s=math_timeout_s), rm_type)
