"""The embedded engine's HTTP front: SGLang's native API subset on aiohttp, in a background thread.

Why separate from `engine.py`: this module only maps routes to engine calls (request bodies are parsed and
validated by `http_parse.py`); all model work stays in the engine, whose surface the front needs is stated once
as `ServedEngine`. The server runs its own event loop in a daemon thread; blocking engine calls (weight
updates, pause) run in the loop's thread pool, so `/health` answers meanwhile.

Routes: GET /health, /health_generate, /server_info (+ /get_server_info), /model_info (+ /get_model_info),
/get_load; POST /generate, /flush_cache, /pause_generation, /continue_generation, /abort_request (`rid` or
`abort_all`), /update_weights_from_tensor, /init_weights_update_group, /update_weights_from_distributed,
/destroy_weights_update_group, /weights_checksum (our extension), /release_memory_occupation,
/resume_memory_occupation, /p2p/prepare + /p2p/commit + /p2p/close (our extension: Mooncake P2P weight sync, see
`p2p_receiver.py`). Weight routes go to the engine's
`EngineWeights` (`weights.py`).

Weight updates accept SGLang's `flush_cache` and ignore it (`/flush_cache` too): the KV cache lives only as long
as one batch, so there is no prefix cache to flush. `update_weights_from_tensor` loads entry 0 of
`serialized_named_tensors` (the TP-rank-0 entry; this engine has one rank), in `glm_rl.tensors.v1` (JSON, never
unpickled; `weights/wire.py`). Only with an API key set (the caller then proved it) does the engine open buffers
by reference (shared memory, CUDA IPC) or take SGLang's pickled form, and that through a tensor-only unpickler.

Security: with `api_key` set (a run always sets its per-run secret), every route but /health* needs it — the
admin ones included: weights, groups, P2P, pause / continue, memory, flush_cache; SGLang also leaves /health*
open (sglang-router health-checks workers without the key). A weights-update group join waits at most
`weight_group_timeout_s`, then answers 400 and frees its thread.

Errors: bad input → 400 (413 for bodies over `max_request_bytes`; JSON nested deeper than
`http_parse.MAX_JSON_DEPTH` is a 400 too) with `{"object": "error", "message": ...}` naming the field; a missing
/ wrong API key → 401; anything unexpected → 500. The server stays up.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from aiohttp import web

from glm_rl.engine.batch import GenerationRequest, SamplingParams
from glm_rl.engine.config import EngineConfig
from glm_rl.engine.http_parse import BadRequest, parse_generate, parse_json_body, parse_version, require
from glm_rl.engine.weights import EngineWeights
from glm_rl.weights.wire import WeightError, decode_flattened, decode_named_tensors


class ServedEngine(Protocol):
    """What the HTTP front calls on the engine (`EmbeddedEngine`, started)."""

    config: EngineConfig
    weights: EngineWeights
    vocab_size: int
    max_total_len: int

    @property
    def weight_version(self) -> int: ...
    def next_auto_key(self) -> str: ...
    def submit(self, requests: list[GenerationRequest]) -> list[Future]: ...
    def server_info(self) -> dict[str, Any]: ...
    def load(self) -> list[dict[str, int]]: ...
    def pause(self, mode: str = "abort") -> dict[str, Any]: ...
    def abort_request(self, rid: str = "", abort_all: bool = False) -> dict[str, Any]: ...
    def resume(self) -> dict[str, Any]: ...
    def set_memory_released(self, released: bool, tags: list[str] | None = None) -> dict[str, Any]: ...


def _tags(body: dict) -> list[str] | None:
    """SGLang's optional memory-occupation `tags`: a list of strings (the engine checks the names)."""
    tags = body.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        raise BadRequest(f"tags: expected a list of strings, got {tags!r}")
    return tags


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"object": "error", "success": False, "message": message, "code": status}, status=status)


# -- handlers --------------------------------------------------------------------------------------------------
async def _json_body(request: web.Request) -> dict:
    return parse_json_body(await request.read())  # read() raises 413 over client_max_size


def _blocking(fn: Callable[[dict], Any]):
    """A POST handler that runs `fn(body)` in the loop's thread pool (so /health keeps answering)."""

    async def handler(request: web.Request) -> web.Response:
        body = await _json_body(request)
        result = await asyncio.get_running_loop().run_in_executor(None, fn, body)
        return web.json_response(result)

    return handler


def _update_from_tensor(weights: EngineWeights, trusted: bool) -> Callable[[dict], Any]:
    """`trusted`: the engine has an API key, so the middleware has checked the caller's (SGLang's pickled form
    and by-reference buffers are decoded only then; `weights/wire.py`)."""

    def run(body: dict) -> Any:
        payloads = require(body, "serialized_named_tensors", list)
        load_format = body.get("load_format")
        if load_format not in (None, "flattened_bucket"):
            raise BadRequest(f"load_format: null or 'flattened_bucket' supported, got {load_format!r}")
        if not payloads or not isinstance(payloads[0], str):
            raise BadRequest("serialized_named_tensors: expected a non-empty list of strings")
        if load_format == "flattened_bucket":
            return weights.load_flattened(*decode_flattened(payloads[0], trusted=trusted), parse_version(body))
        named = decode_named_tensors(payloads[0], trusted=trusted)  # tp rank 0's entry
        return weights.load(named, parse_version(body))

    return run


def _post_routes(engine: ServedEngine) -> dict[str, Callable[[dict], Any]]:
    """The blocking POST routes: weight updates (`engine.weights`), pause / continue, memory occupation."""
    w = engine.weights
    return {
        "/update_weights_from_tensor": _update_from_tensor(w, trusted=bool(engine.config.api_key)),
        "/init_weights_update_group": lambda b: w.init_group(
            master_address=require(b, "master_address", str),
            master_port=require(b, "master_port", int),
            rank_offset=require(b, "rank_offset", int),
            world_size=require(b, "world_size", int),
            group_name=require(b, "group_name", str),
            backend=b.get("backend") or "gloo",
        ),
        "/update_weights_from_distributed": lambda b: w.update_from_distributed(
            names=require(b, "names", list),
            dtypes=require(b, "dtypes", list),
            shapes=require(b, "shapes", list),
            group_name=require(b, "group_name", str),
            weight_version=parse_version(b),
        ),
        "/destroy_weights_update_group": lambda b: w.destroy_group(require(b, "group_name", str)),
        "/weights_checksum": lambda b: w.checksums(b.get("names"), b.get("algo", "sha256")),
        "/p2p/prepare": lambda b: w.p2p.prepare(
            require(b, "tensors", list), require(b, "buffer_bytes", int), b.get("protocol") or "tcp"
        ),
        "/p2p/commit": lambda b: w.p2p.commit(parse_version(b)),
        "/p2p/close": lambda b: w.p2p.close(),
        "/pause_generation": lambda b: engine.pause(b.get("mode") or "abort"),
        "/continue_generation": lambda b: engine.resume(),
        "/abort_request": lambda b: engine.abort_request(b.get("rid") or "", bool(b.get("abort_all"))),
        "/release_memory_occupation": lambda b: engine.set_memory_released(True, _tags(b)),
        "/resume_memory_occupation": lambda b: engine.set_memory_released(False, _tags(b)),
    }


def _generate_handler(engine: ServedEngine):
    async def generate(request: web.Request) -> web.Response:
        requests, batched = parse_generate(
            await _json_body(request),
            engine.config,
            vocab_size=engine.vocab_size,
            max_total_len=engine.max_total_len,
            next_key=engine.next_auto_key,
        )
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in engine.submit(requests)))
        return web.json_response(results if batched else results[0])

    return generate


def _health_generate_handler(engine: ServedEngine):
    async def health_generate(request: web.Request) -> web.Response:
        info = engine.server_info()
        if info["paused"]:
            return web.Response(text="paused")
        if "weights" in info["memory_released"]:  # colocated training phase: nothing to generate with
            return web.Response(text="memory released")
        probe = GenerationRequest(
            rid=f"HEALTH_CHECK_{uuid.uuid4().hex}",
            input_ids=(0,),
            sampling=SamplingParams(temperature=0.0, max_new_tokens=1),
            seed=0,
        )
        await asyncio.wait_for(asyncio.wrap_future(engine.submit([probe])[0]), timeout=60)
        return web.Response(text="OK")

    return health_generate


def _middlewares(api_key: str | None) -> list:
    @web.middleware
    async def errors(request: web.Request, handler):
        exempt = request.path.startswith("/health")  # as SGLang: the router health-checks without the key
        if api_key and not exempt and request.headers.get("Authorization") != f"Bearer {api_key}":
            return _error(401, "unauthorized: send 'Authorization: Bearer <api key>'")
        try:
            return await handler(request)
        except BadRequest as e:
            return _error(e.status, str(e))
        except (WeightError, ValueError) as e:
            return _error(400, str(e))
        except web.HTTPRequestEntityTooLarge as e:
            return _error(413, f"body: {e.text}")
        except web.HTTPException as e:
            return _error(e.status, e.reason)
        except Exception as e:  # noqa: BLE001 - report, keep serving
            logging.getLogger(__name__).exception("request %s failed", request.path)
            return _error(500, f"{type(e).__name__}: {e}")

    return [errors]


def build_app(engine: ServedEngine, config: EngineConfig) -> web.Application:
    app = web.Application(client_max_size=config.max_request_bytes, middlewares=_middlewares(config.api_key))

    def model_info() -> dict[str, Any]:
        return {
            "model_path": str(config.hf_checkpoint),
            "tokenizer_path": str(config.hf_checkpoint),
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": engine.weight_version,
        }

    for path in ("/server_info", "/get_server_info"):
        app.router.add_get(path, _answer(engine.server_info))
    for path in ("/model_info", "/get_model_info"):
        app.router.add_get(path, _answer(model_info))
    app.router.add_get("/health", _answer(lambda: "OK"))
    app.router.add_get("/health_generate", _health_generate_handler(engine))
    app.router.add_get("/get_load", _answer(engine.load))
    app.router.add_route("*", "/flush_cache", _answer(lambda: "Cache flushed."))  # no prefix cache to flush
    app.router.add_post("/generate", _generate_handler(engine))
    for path, fn in _post_routes(engine).items():
        app.router.add_post(path, _blocking(fn))
    return app


def _answer(payload: Callable[[], Any]):
    """A handler answering `payload()`: text for str, JSON otherwise."""

    async def handler(request: web.Request) -> web.Response:
        value = payload()
        return web.Response(text=value) if isinstance(value, str) else web.json_response(value)

    return handler


class _DropHttp2Probes(logging.Filter):
    """sglang-router probes workers for gRPC (HTTP/2 preface); aiohttp logs each probe as an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "PRI/Upgrade" not in str(record.exc_info[1] if record.exc_info else record.getMessage())


class HttpServer:
    """Runs `build_app(engine, config)` on its own event loop in a daemon thread."""

    def __init__(self, engine: ServedEngine, config: EngineConfig) -> None:
        self.app, self.config = build_app(engine, config), config
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="engine-http", daemon=True)
        self._filter = _DropHttp2Probes()

    def start(self) -> tuple[str, int]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.host, self.config.port))
        logging.getLogger("aiohttp.server").addFilter(self._filter)
        if not self.config.api_key and self.config.host not in ("127.0.0.1", "localhost", "::1"):
            logging.getLogger(__name__).warning(
                "engine on %s:%d has no API key: anyone who reaches it can pause it or replace its weights",
                self.config.host,
                self.config.port,
            )
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(sock), self._loop).result(timeout=30)
        return sock.getsockname()[:2]

    async def _serve(self, sock: socket.socket) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()
        logging.getLogger("aiohttp.server").removeFilter(self._filter)
