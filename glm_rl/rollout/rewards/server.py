"""The reward server: any built-in grader or custom function behind HTTP, for `--rm-type remote_rm`.

    python -m glm_rl.rollout.rewards.server --rm-type math --port 8000
    python -m glm_rl.rollout.rewards.server --custom-rm-path my_task.rewards.judge --group-rm --port 8000

POST /reward (or /) takes one sample `{"response", "label", "metadata", "prompt", "name"}` and answers
`{"reward": 1.0}`, or one group `{"responses": [...], "label", ...}` and answers `{"reward": [1.0, 0.0]}` (the wire
format of remote.py; the key is `--reward-key`). A malformed body is a 400 naming the field; a grader that raises
is a 500 with its message (the client retries 5xx, then fails naming the sample). GET /health says what it serves.
Port 0 picks a free port; the line printed at start names the one bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from glm_rl.rollout.rewards.hub import Rewarder, build_rewarder
from glm_rl.rollout.rewards.math_grader import DEFAULT_TIMEOUT_S
from glm_rl.rollout.rewards.request import RewardRequest

logger = logging.getLogger(__name__)


class BadRequest(ValueError):
    pass


def _field(body: dict, key: str, kind: type | tuple, default: Any) -> Any:
    value = body.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, kind):
        raise BadRequest(f"field {key!r} must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def parse_body(body: Any) -> RewardRequest | list[RewardRequest]:
    """A sample or a group (the samples of one prompt) from a request body; BadRequest naming the field."""
    if not isinstance(body, dict):
        raise BadRequest(f"expected a JSON object, got {type(body).__name__}")
    label = body.get("label")
    shared = {
        "label": "" if label is None else str(label),
        "metadata": _field(body, "metadata", dict, {}),
        "prompt": _field(body, "prompt", (str, list), ""),
    }
    if "responses" not in body:
        response = _field(body, "response", str, None)
        return RewardRequest(response, name=str(body.get("name", "?")), **shared)
    responses = _field(body, "responses", list, [])
    names = _field(body, "names", list, [str(i) for i in range(len(responses))])
    if not responses or len(names) != len(responses) or not all(isinstance(r, str) for r in responses):
        raise BadRequest("field 'responses' must be a non-empty list of strings ('names', if given, as long)")
    return [RewardRequest(r, name=str(n), **shared) for r, n in zip(responses, names)]


def make_app(rewarder: Rewarder, *, reward_key: str = "reward", description: str = "") -> web.Application:
    async def reward(request: web.Request) -> web.Response:
        try:
            parsed = parse_body(json.loads(await request.text()))
        except (json.JSONDecodeError, BadRequest) as e:
            return web.json_response({"error": f"bad request: {e}"}, status=400)
        try:
            if isinstance(parsed, list):
                value: Any = await rewarder.score_group(parsed)
            else:
                value = await rewarder.score(parsed)
        except Exception as e:  # reported to the client, which fails naming the sample
            logger.exception("reward server: grading failed")
            return web.json_response({"error": str(e)}, status=500)
        return web.json_response({reward_key: value})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "serves": description})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.add_routes([web.post("/reward", reward), web.post("/", reward), web.get("/health", health)])
    return app


async def _run(app: web.Application, host: str, port: int, description: str) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"reward server: {description} on http://{host}:{bound}/reward", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def serve(
    rm_type: str = "math",
    *,
    custom_rm_path: str | None = None,
    group_rm: bool = False,
    host: str = "127.0.0.1",
    port: int = 8000,
    reward_key: str = "reward",
    math_timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Serve `rm_type` (a rule grader) or `custom_rm_path` until interrupted. What `glm-rl reward-server` calls."""
    if rm_type == "remote_rm" and not custom_rm_path:
        raise ValueError("the reward server serves a rule grader or --custom-rm-path, not remote_rm")
    rewarder = build_rewarder(rm_type, custom_rm_path=custom_rm_path, group_rm=group_rm, math_timeout_s=math_timeout_s)
    description = custom_rm_path or rm_type
    app = make_app(rewarder, reward_key=reward_key, description=description)
    try:
        asyncio.run(_run(app, host, port, description))
    except KeyboardInterrupt:
        pass


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m glm_rl.rollout.rewards.server", description=__doc__.split("\n")[0])
    p.add_argument("--rm-type", default="math", help="the rule grader to serve (see rule.py)")
    p.add_argument("--custom-rm-path", default=None, help="serve this function (package.module.function) instead")
    p.add_argument("--group-rm", action="store_true", help="the custom function scores a group at a time")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    p.add_argument("--reward-key", default="reward", help="the key of the reward in each reply")
    p.add_argument("--math-timeout-s", type=float, default=DEFAULT_TIMEOUT_S, help="time limit of one comparison")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(
            a.rm_type,
            custom_rm_path=a.custom_rm_path,
            group_rm=a.group_rm,
            host=a.host,
            port=a.port,
            reward_key=a.reward_key,
            math_timeout_s=a.math_timeout_s,
        )
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
