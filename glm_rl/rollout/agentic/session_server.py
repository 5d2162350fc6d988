"""`/v1/chat/completions` on loopback, in front of the engines: the HTTP side of `session.Session`.

The server runs on the caller's event loop (the rollout's), so a session's `generate` (the framework's
`GenerateContext.generate`, bound to that loop) is awaited where it was made; it knows no engine URL.

The session id is the `X-Session-Id` header, else the body's `user` field (both present: they must agree).
Sessions are opened and closed in Python (`open` / `close`, by `openai_agent.generate`), never over HTTP, so
an agent cannot reach another sample's session by accident: an unknown id is a 404.

Routes: POST /v1/chat/completions, GET /v1/models. Errors use OpenAI's shape, `{"error": {"message", "type",
"param", "code"}}`, so the `openai` client raises its typed errors (400 BadRequestError, 404 NotFoundError, ...).
"""

from __future__ import annotations

import asyncio
import json
import uuid
import weakref
from typing import Any

from aiohttp import web

from glm_rl.rollout.agentic.session import Session, SessionError

SESSION_HEADER = "X-Session-Id"
MODEL_NAME = "policy"  # what /v1/models lists; any model name is accepted


def _error(e: SessionError) -> web.Response:
    kind = "invalid_request_error" if e.status < 500 else "server_error"
    body = {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}}
    return web.json_response(body, status=e.status)


class SessionServer:
    """An aiohttp app on 127.0.0.1 (a free port) holding the open sessions by id."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, max_request_bytes: int = 64 << 20) -> None:
        self.host, self.port, self.max_request_bytes = host, port, max_request_bytes
        self.sessions: dict[str, Session] = {}
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> SessionServer:
        app = web.Application(client_max_size=self.max_request_bytes)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def open(self, session_id: str | None = None, **kwargs: Any) -> Session:
        """A new session (`Session`'s fields as keywords), served under `session_id` (default: a fresh uuid)."""
        sid = session_id or uuid.uuid4().hex
        if sid in self.sessions:
            raise ValueError(f"session {sid!r} is already open")
        self.sessions[sid] = session = Session(id=sid, **kwargs)
        return session

    def close(self, session_id: str) -> Session:
        """Stop serving the session (later requests get 404) and return it."""
        return self.sessions.pop(session_id)

    # -- handlers ----------------------------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "owned_by": "glm_rl"}]}
        )

    async def _chat(self, request: web.Request) -> web.Response:
        try:
            try:
                body = json.loads(await request.read())
            except ValueError as e:
                raise SessionError(400, f"request body: not valid JSON ({e})") from e
            except web.HTTPRequestEntityTooLarge as e:
                raise SessionError(413, f"request body over {self.max_request_bytes} bytes") from e
            session = self._session(request, body)
            return web.json_response(await session.complete(body))
        except SessionError as e:
            return _error(e)

    def _session(self, request: web.Request, body: Any) -> Session:
        header = request.headers.get(SESSION_HEADER)
        user = body.get("user") if isinstance(body, dict) else None
        if header and user and header != user:
            raise SessionError(
                400, f"session id: header {SESSION_HEADER} {header!r} and body field user {user!r} differ", param="user"
            )
        sid = header or user
        if not sid:
            raise SessionError(400, f"no session id: send the {SESSION_HEADER} header or the user field", param="user")
        session = self.sessions.get(sid)
        if session is None:
            raise SessionError(404, f"unknown session {sid!r} (never opened, or already finished)", "session_not_found")
        return session


_SERVERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task] = weakref.WeakKeyDictionary()


async def shared_server() -> SessionServer:
    """This event loop's server, started on first use (concurrent first callers share one start)."""
    loop = asyncio.get_running_loop()
    task = _SERVERS.get(loop)
    if task is None or (task.done() and task.exception() is not None):
        task = _SERVERS[loop] = loop.create_task(SessionServer().start())
    return await asyncio.shield(task)


async def stop_shared_server() -> None:
    """Stop this loop's server (tests; a rollout's server lives as long as its loop)."""
    task = _SERVERS.pop(asyncio.get_running_loop(), None)
    if task is not None:
        await (await task).stop()
