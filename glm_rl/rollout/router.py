"""Launch the real sglang-router in front of the rollout engines, and decide where each /generate goes.

Why: rollout requests are balanced over engines by SGLang's own router (Rust, `sglang-router` 0.3.2), exactly as
on a GPU cluster; `RouterProcess` owns that process (command as a `list[str]`, readiness wait, worker add /
remove through its `/workers` API, process-group shutdown).

What survives the router (0.3.2, seen by a capture worker and asserted in tests/test_router.py): it parses
/generate into its own `GenerateRequest` and re-serialises it, so only fields it knows reach the engine —
`input_ids`, `sampling_params` (temperature, max_new_tokens, top_p, top_k, stop_token_ids, ignore_eos,
sampling_seed, ...), `return_logprob`, `logprob_start_len`, `top_logprobs_num`, `return_text_in_logprobs`,
`stream`, `return_hidden_states`, `return_entropy`, `rid` (a string only: a list of rids is rejected with an
error, so send one prompt per request through it) and some defaults it adds (`model`, `log_metrics`, ...).
`return_routed_experts` is DROPPED, so the engine never records the routing. The response body passes through
unchanged.

The R3 path (`RolloutEndpoints`): `glm-rl train` starts its engines with `return_routed_experts_by_default`,
so they answer every /generate with the routing even though the router dropped the request's flag; R3 requests
then go through the router like all others (`engines_return_routing=True`). For engines that do not (e.g. a
stock SGLang server), a request that needs routed experts is sent straight to one engine, chosen round-robin
(client side) over the router's current healthy workers (`GET /workers`, cached for `refresh_s`). Direct
requests skip the router's retries and circuit breaker, so an engine failure surfaces as an error.
`RouterProcess.generate_fn()` hands the rollout manager `RolloutEndpoints.generate` (payload → answer,
picklable for a Ray actor), which applies this rule per payload.

API key: with `api_key`, the router requires `Authorization: Bearer <key>` from clients and forwards it to
workers on every call except its `/health` checks (engines leave /health* open, as SGLang does).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from glm_rl.ray.addresses import free_port
from glm_rl.rollout.engine_client import EngineClient, EngineError

POLICIES = ("random", "round_robin", "cache_aware", "power_of_two")


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    worker_urls: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port
    prometheus_port: int = 0  # 0: pick a free port
    policy: str = "round_robin"  # the router's default, cache_aware, sent all our traffic to one worker
    api_key: str | None = None  # the router's key; it also forwards it to workers
    log_level: str = "warn"
    extra_args: tuple[str, ...] = ()
    startup_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"RouterConfig.policy must be one of {POLICIES}, got {self.policy!r}")


def router_command(config: RouterConfig, *, port: int, prometheus_port: int, python: str = sys.executable) -> list[str]:
    """The launch command (ports already resolved)."""
    cmd = [python, "-m", "sglang_router.launch_router"]
    if config.worker_urls:
        cmd += ["--worker-urls", *config.worker_urls]
    cmd += [
        "--host",
        config.host,
        "--port",
        str(port),
        "--policy",
        config.policy,
        "--prometheus-host",
        config.host,
        "--prometheus-port",
        str(prometheus_port),
        "--log-level",
        config.log_level,
    ]
    if config.api_key:
        cmd += ["--api-key", config.api_key]
    return cmd + list(config.extra_args)


def _same_url(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


class RouterProcess:
    """One sglang-router process: `start()` → url, `add_worker`, `remove_worker`, `shutdown()` (= `stop()`).

    `RouterProcess(RouterConfig(...))`, or the shorthand `RouterProcess(worker_urls, api_key=..., ...)` (keyword
    arguments are RouterConfig fields).
    """

    def __init__(self, config: RouterConfig | Sequence[str], **overrides: Any) -> None:
        if not isinstance(config, RouterConfig):
            config = RouterConfig(worker_urls=tuple(config), **overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.log_path = ""
        self.client: EngineClient | None = None

    def start(self) -> str:
        port = self.config.port or free_port(self.config.host)
        prom = self.config.prometheus_port or free_port(self.config.host)
        self.command = router_command(self.config, port=port, prometheus_port=prom)
        fd, self.log_path = tempfile.mkstemp(prefix="sglang-router-", suffix=".log")
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.url = f"http://{self.config.host}:{port}"
        self.client = EngineClient(self.url, api_key=self.config.api_key, timeout=10)
        self._wait(lambda: all(self._healthy(u) for u in self.config.worker_urls), "workers healthy")
        return self.url

    def _wait(self, condition, what: str, timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (timeout_s or self.config.startup_timeout_s)
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"sglang-router exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if self.client.health() and condition():
                    return
            except (OSError, ValueError, EngineError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"sglang-router at {self.url}: {what} not reached: {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def workers(self) -> list[dict[str, Any]]:
        """The router's worker list (`GET /workers`): dicts with id, url, is_healthy, load, ..."""
        return list(self.client.get("/workers").get("workers", []))

    def _find(self, url: str) -> dict[str, Any] | None:
        return next((w for w in self.workers() if _same_url(w.get("url", ""), url)), None)

    def _healthy(self, url: str) -> bool:
        worker = self._find(url)
        return bool(worker and worker.get("is_healthy"))

    def add_worker(self, url: str, timeout_s: float = 60.0) -> str:
        """Register a worker and wait until the router reports it healthy; returns its worker id."""
        body: dict[str, Any] = {"url": url}
        if self.config.api_key:
            body["api_key"] = self.config.api_key
        answer = self.client.post("/workers", body)
        self._wait(lambda: self._healthy(url), f"worker {url} healthy", timeout_s)
        worker = self._find(url)
        return str(worker.get("id") or answer.get("worker_id"))

    def remove_worker(self, url_or_id: str, timeout_s: float = 30.0) -> None:
        """Deregister a worker (by url or id) and wait until the router no longer lists it."""
        worker = self._find(url_or_id)
        worker_id = worker["id"] if worker else url_or_id
        self.client.request("DELETE", f"/workers/{worker_id}")
        self._wait(
            lambda: not any(w.get("id") == worker_id for w in self.workers()), f"worker {url_or_id} removed", timeout_s
        )

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the router's process group, SIGKILL it if still there after `timeout_s`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=timeout_s)
                return
            except subprocess.TimeoutExpired:
                continue

    stop = shutdown

    def endpoints(self, refresh_s: float = 5.0) -> RolloutEndpoints:
        return RolloutEndpoints(self.url, api_key=self.config.api_key, refresh_s=refresh_s)

    def generate_fn(self):
        """The rollout manager's `GenerateFn` (payload → answer), R3-aware; picklable (Ray actor argument)."""
        return self.endpoints().generate

    def __enter__(self) -> RouterProcess:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class RolloutEndpoints:
    """Where a rollout /generate request goes: the router, or (R3) an engine picked round-robin.

    `url_for(needs_routed_experts)`: the router's url when False; otherwise the next healthy worker of the
    router (`GET /workers`, refreshed every `refresh_s` seconds). `generate(payload)` posts a SGLang /generate
    payload to `url_for(payload.get("return_routed_experts"))` — the rollout manager's `GenerateFn`.

    Requests share one keep-alive HTTP session per event loop, with no connection cap: a rollout posts hundreds
    of requests at once, and a session (and TCP connection) per request took ~0.5 s to get 512 of them to the
    engine, long enough that the engine's batch window split them (aiohttp's default cap of 100 connections
    would split them into waves).
    """

    def __init__(
        self,
        router_url: str,
        api_key: str | None = None,
        refresh_s: float = 5.0,
        timeout: float = 600.0,
        engines_return_routing: bool = False,
    ) -> None:
        self.router_url, self.api_key = router_url.rstrip("/"), api_key
        self.engines_return_routing = engines_return_routing
        self.refresh_s, self.timeout = refresh_s, timeout
        self._lock = threading.Lock()
        self._workers: list[str] = []
        self._fetched_at = float("-inf")
        self._next = 0
        self._session = None  # (event loop, aiohttp.ClientSession): the loop's shared session

    def __getstate__(self) -> dict[str, Any]:  # picklable (sent to a Ray actor): the lock and cache stay behind
        return {
            k: getattr(self, k) for k in ("router_url", "api_key", "refresh_s", "timeout", "engines_return_routing")
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def _worker_urls(self) -> list[str]:
        if time.monotonic() - self._fetched_at > self.refresh_s or not self._workers:
            listing = EngineClient(self.router_url, self.api_key, timeout=10).get("/workers")
            self._workers = sorted(w["url"] for w in listing.get("workers", []) if w.get("is_healthy", True))
            self._fetched_at = time.monotonic()
        return self._workers

    def url_for(self, needs_routed_experts: bool) -> str:
        if not needs_routed_experts or self.engines_return_routing:
            return self.router_url
        with self._lock:
            workers = self._worker_urls()
            if not workers:
                raise RuntimeError(f"router {self.router_url} lists no healthy worker for a routed-experts request")
            url = workers[self._next % len(workers)]
            self._next += 1
            return url

    async def generate(self, payload: dict[str, Any], session=None) -> Any:
        url = self.url_for(bool(payload.get("return_routed_experts")))
        client = EngineClient(url, self.api_key, self.timeout)
        return await client.apost("/generate", payload, session=session or self._shared_session())

    def _shared_session(self):
        import aiohttp

        loop = asyncio.get_running_loop()
        if self._session is None or self._session[0] is not loop or self._session[1].closed:
            connector = aiohttp.TCPConnector(limit=0)  # no cap: every request of a rollout goes out at once
            self._session = loop, aiohttp.ClientSession(connector=connector, trust_env=False)
        return self._session[1]
