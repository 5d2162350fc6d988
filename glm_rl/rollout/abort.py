"""Abort the requests in flight on every rollout engine: SGLang's `POST /abort_request {"abort_all": true}`.

Why per engine and not through the router: sglang-router 0.3.2 does not forward /abort_request (slime posts to
each worker too). The engines are the router's current workers (`GET /workers`). An aborted /generate answers
with what it had produced and finish_reason "abort". Picklable: the rollout manager (a Ray actor) holds one.
"""

from __future__ import annotations

import asyncio
import logging

from glm_rl.rollout.engine_client import EngineClient

log = logging.getLogger(__name__)


class AbortEngines:
    def __init__(self, router_url: str, api_key: str | None = None, timeout: float = 10.0) -> None:
        self.router_url, self.api_key, self.timeout = router_url, api_key, timeout

    async def __call__(self) -> int:
        """Send abort_all to every worker; returns how many answered (an engine that is gone is skipped)."""
        router = EngineClient(self.router_url, self.api_key, self.timeout)
        listing = await asyncio.to_thread(router.get, "/workers")
        urls = [w["url"] for w in listing.get("workers", [])]
        results = await asyncio.gather(
            *(EngineClient(u, self.api_key, self.timeout).apost("/abort_request", {"abort_all": True}) for u in urls),
            return_exceptions=True,
        )
        for url, r in zip(urls, results):
            if isinstance(r, BaseException):
                log.warning("abort_request to %s failed: %s", url, r)
        return sum(not isinstance(r, BaseException) for r in results)
