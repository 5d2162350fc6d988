"""Remote reward model client (`--rm-type remote_rm --rm-url URL`): POST each sample, or each group with
`--group-rm`, as JSON and read the reward back.

Wire format (server.py speaks it):
  sample  {"name", "prompt", "response", "label", "metadata"}            -> 0.5      or {"reward": 0.5}
  group   {"names", "prompt", "responses", "label", "metadata"}          -> [1, 0]   or {"reward": [1, 0]}
An object reply is read at `reward_key` (`--reward-key`, default "reward").

Failure handling: at most `max_concurrency` requests in flight; each attempt is bounded by `timeout_s`;
connection errors, timeouts, HTTP 5xx and 429 are retried `max_retries` times with exponential backoff
(`backoff_s` · 2^k, capped at `max_backoff_s`, plus up to 25% jitter so retries don't arrive in lockstep).
Anything else (another 4xx, a reply that is not JSON or not a number) fails at once. Either way the result is a
RemoteRewardError naming the sample(s) and the last cause: a reward is never silently 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from typing import Any

import aiohttp

from glm_rl.rollout.rewards.request import RewardError, RewardRequest, as_reward, as_rewards, describe, group_json

logger = logging.getLogger(__name__)


class RemoteRewardError(RewardError):
    """The remote reward model gave no usable answer; the message names the sample(s), the URL and the cause."""


class _Retryable(Exception):
    pass


class RemoteRewardClient:
    def __init__(
        self,
        url: str,
        *,
        group: bool = False,
        reward_key: str = "reward",
        max_concurrency: int = 64,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--rm-url {url!r}: expected an http:// or https:// URL")
        if max_concurrency < 1 or timeout_s <= 0 or max_retries < 0:
            raise ValueError(
                f"remote reward: max_concurrency={max_concurrency} (>= 1), timeout_s={timeout_s} (> 0), "
                f"max_retries={max_retries} (>= 0)"
            )
        self.url, self.group, self.reward_key = url, group, reward_key
        self.max_concurrency, self.timeout_s, self.max_retries = max_concurrency, timeout_s, max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.retried = 0  # attempts that failed and were retried (a metric for the caller)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None

    async def score(self, request: RewardRequest) -> float:
        what = f"sample {request.name}"
        return as_reward(self._read(await self._post(request.to_json(), what), what), what)

    async def score_group(self, group: list[RewardRequest]) -> list[float]:
        if not self.group:
            return list(await asyncio.gather(*(self.score(r) for r in group)))
        what = describe(group)
        return as_rewards(self._read(await self._post(group_json(group), what), what), group, what)

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = self._loop = None

    def _read(self, reply: Any, what: str) -> Any:
        if isinstance(reply, dict):
            if self.reward_key not in reply:
                raise RemoteRewardError(
                    f"{what}: {self.url} replied with an object without {self.reward_key!r} "
                    f"(keys: {sorted(reply)}); set --reward-key"
                )
            return reply[self.reward_key]
        return reply

    def _ensure_session(self) -> aiohttp.ClientSession:
        """One session per event loop (a session cannot move between loops)."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.max_concurrency)
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
            self._slots, self._loop = asyncio.Semaphore(self.max_concurrency), loop
        return self._session

    def _backoff(self, attempt: int) -> float:
        delay = min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)
        return delay * (1 + 0.25 * random.random())

    async def _post(self, body: dict[str, Any], what: str) -> Any:
        session, last = self._ensure_session(), ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retried += 1
                logger.warning("remote reward for %s: %s; retry %d/%d", what, last, attempt, self.max_retries)
                await asyncio.sleep(self._backoff(attempt))
            try:
                async with self._slots:
                    return await self._attempt(session, body, what)
            except _Retryable as e:
                last = str(e)
            except (aiohttp.ClientError, TimeoutError) as e:
                last = f"no answer within {self.timeout_s}s" if isinstance(e, TimeoutError) else repr(e)
        raise RemoteRewardError(
            f"{what}: remote reward at {self.url} failed {self.max_retries + 1} times "
            f"(timeout {self.timeout_s}s each); last error: {last}"
        )

    async def _attempt(self, session: aiohttp.ClientSession, body: dict[str, Any], what: str) -> Any:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with session.post(self.url, json=body, timeout=timeout) as resp:
            text = await resp.text()
        if resp.status >= 500 or resp.status == 429:
            raise _Retryable(f"HTTP {resp.status}: {text[:200]}")
        if resp.status >= 400:
            raise RemoteRewardError(f"{what}: {self.url} answered HTTP {resp.status}: {text[:300]}")
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise RemoteRewardError(f"{what}: {self.url} replied with non-JSON: {text[:200]!r}") from None
