"""The embedded engine's HTTP front: SGLang's native API subset on aiohttp, in a background thread.

Why separate from `embedded.py`: this module only parses and validates JSON and maps routes to `EmbeddedEngine`
methods; all model work stays in the engine. The server runs its own event loop in a daemon thread; blocking
engine calls (weight updates, pause) run in the loop's thread pool, so `/health` answers meanwhile.

Routes: GET /health, /health_generate, /server_info (+ /get_server_info), /model_info (+ /get_model_info),
/get_load; POST /generate, /flush_cache, /pause_generation, /continue_generation, /update_weights_from_tensor,
/init_weights_update_group, /update_weights_from_distributed, /destroy_weights_update_group, /weights_checksum
(our extension), /release_memory_occupation, /resume_memory_occupation, /p2p/prepare + /p2p/commit + /p2p/close
(our extension: Mooncake P2P weight sync, see `p2p_receiver.py`).

Weight updates accept SGLang's `flush_cache` and ignore it (`/flush_cache` too): the KV cache lives only as long
as one batch, so there is no prefix cache to flush. `update_weights_from_tensor` loads entry 0 of
`serialized_named_tensors` (the TP-rank-0 entry; this engine has one rank).

Errors: bad input → 400 (413 for bodies over `max_request_bytes`) with `{"object": "error", "message": ...}`
naming the field; a missing / wrong API key → 401 (every route but /health*, which SGLang also leaves
open: sglang-router health-checks workers without the key); anything unexpected → 500. The server stays up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import uuid
from typing import TYPE_CHECKING, Any, Callable

from aiohttp import web

from glm_rl.engine.engine import WeightError
from glm_rl.engine.generation import GenerationRequest, SamplingParams, request_seed

if TYPE_CHECKING:
    from glm_rl.engine.engine import EmbeddedEngine, EngineConfig


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"object": "error", "success": False, "message": message, "code": status},
                             status=status)


# -- validation ----------------------------------------------------------------------------------------------
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _field(d: dict, key: str, default: Any, kind: str, where: str) -> Any:
    value = d.get(key)
    if value is None:
        return default
    ok = {"int": _is_int(value), "bool": isinstance(value, bool),
          "number": (_is_int(value) or isinstance(value, float))}[kind]
    if not ok:
        raise BadRequest(f"{where}{key}: expected {kind}, got {value!r}")
    return value


def _check_ids(ids: Any, where: str, vocab_size: int, allow_empty: bool = False) -> tuple[int, ...]:
    if not isinstance(ids, list) or (not ids and not allow_empty):
        raise BadRequest(f"{where}: expected a non-empty list of token ids")
    for i, t in enumerate(ids):
        if not _is_int(t):
            raise BadRequest(f"{where}[{i}]: expected int token id, got {t!r}")
        if not 0 <= t < vocab_size:
            raise BadRequest(f"{where}[{i}]: token id {t} outside the vocabulary [0, {vocab_size})")
    return tuple(ids)


def parse_sampling(sp: Any, where: str, vocab_size: int,
                   default_max_new: int) -> tuple[SamplingParams, int | None]:
    """SamplingParams and the optional `sampling_seed` from a JSON sampling_params object."""
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise BadRequest(f"{where}: expected an object")
    w = f"{where}."
    temperature = float(_field(sp, "temperature", 1.0, "number", w))
    top_p = float(_field(sp, "top_p", 1.0, "number", w))
    max_new = _field(sp, "max_new_tokens", default_max_new, "int", w)
    if temperature < 0:
        raise BadRequest(f"{w}temperature: must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise BadRequest(f"{w}top_p: must be in (0, 1], got {top_p}")
    if max_new <= 0:
        raise BadRequest(f"{w}max_new_tokens: must be >= 1, got {max_new}")
    stop = sp.get("stop_token_ids")
    stop_ids = () if stop is None else _check_ids(stop, f"{w}stop_token_ids", vocab_size, allow_empty=True)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=_field(sp, "top_k", -1, "int", w),
                            max_new_tokens=max_new, stop_token_ids=stop_ids,
                            ignore_eos=_field(sp, "ignore_eos", False, "bool", w),
                            skip_special_tokens=_field(sp, "skip_special_tokens", True, "bool", w))
    return params, _field(sp, "sampling_seed", None, "int", w)


def _per_row(value: Any, n: int, batched: bool, name: str) -> list[Any]:
    if not batched:
        return [value]
    if isinstance(value, list):
        if len(value) != n:
            raise BadRequest(f"{name}: list of {len(value)} for a batch of {n}")
        return value
    return [value] * n


def parse_generate(body: dict, engine: "EmbeddedEngine") -> tuple[list[GenerationRequest], bool]:
    """Validated requests (one per prompt) and whether the input was a batch."""
    if body.get("stream"):
        raise BadRequest("stream: streaming is not supported by this engine")
    ids = body.get("input_ids")
    if ids is None:
        raise BadRequest("input_ids: required (text prompts are not supported)")
    batched = isinstance(ids, list) and bool(ids) and all(isinstance(x, list) for x in ids)
    prompts = ids if batched else [ids]
    if len(prompts) > engine.config.max_batch_size:
        raise BadRequest(f"input_ids: batch of {len(prompts)} over the limit {engine.config.max_batch_size}")
    sps = _per_row(body.get("sampling_params"), len(prompts), batched, "sampling_params")
    rids = _per_row(body.get("rid"), len(prompts), batched, "rid")
    flags = {"return_logprob": _field(body, "return_logprob", False, "bool", ""),
             "return_routed_experts": _field(body, "return_routed_experts",
                                             engine.config.return_routed_experts_by_default, "bool", "")}
    if flags["return_routed_experts"] and not engine.config.record_routed_experts:
        raise BadRequest("return_routed_experts: this engine runs with record_routed_experts=False")
    out = []
    for i, (prompt, sp, rid) in enumerate(zip(prompts, sps, rids)):
        where = f"[{i}]" if batched else ""
        tokens = _check_ids(prompt, f"input_ids{where}", engine.vocab_size)
        room = engine.max_total_len - len(tokens)  # unset max_new_tokens: SGLang's 128, clipped to the context
        if room < 1:
            raise BadRequest(f"input_ids{where}: prompt of {len(tokens)} tokens leaves no room under the context "
                             f"limit {engine.max_total_len}")
        sampling, seed = parse_sampling(sp, f"sampling_params{where}", engine.vocab_size, min(128, room))
        if len(tokens) + sampling.max_new_tokens > engine.max_total_len:
            raise BadRequest(f"sampling_params{where}.max_new_tokens: prompt ({len(tokens)}) + max_new_tokens "
                             f"({sampling.max_new_tokens}) exceeds the context limit {engine.max_total_len}")
        if rid is not None and not isinstance(rid, str):
            raise BadRequest(f"rid{where}: expected a string, got {rid!r}")
        key = (("seed", seed, i) if batched else ("seed", seed)) if seed is not None else \
            (("rid", rid) if rid is not None else engine.next_auto_key())
        out.append(GenerationRequest(rid=rid or uuid.uuid4().hex, input_ids=tokens, sampling=sampling,
                                     seed=request_seed(engine.config.seed, key), **flags))
    return out, batched


# -- handlers --------------------------------------------------------------------------------------------------
async def _json_body(request: web.Request) -> dict:
    raw = await request.read()  # raises 413 over client_max_size
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise BadRequest(f"body: malformed JSON ({e})") from None
    if not isinstance(body, dict):
        raise BadRequest("body: expected a JSON object")
    return body


def _blocking(fn: Callable[[dict], Any]):
    """A POST handler that runs `fn(body)` in the loop's thread pool (so /health keeps answering)."""
    async def handler(request: web.Request) -> web.Response:
        body = await _json_body(request)
        result = await asyncio.get_running_loop().run_in_executor(None, fn, body)
        return web.json_response(result)
    return handler


def _require(body: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in body:
        raise BadRequest(f"{key}: required")
    if not isinstance(body[key], kind) or isinstance(body[key], bool) and kind is not bool:
        raise BadRequest(f"{key}: expected {getattr(kind, '__name__', kind)}, got {body[key]!r}")
    return body[key]


def _version(body: dict) -> int | None:
    v = body.get("weight_version")
    if v is None:
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        raise BadRequest(f"weight_version: expected an integer, got {v!r}") from None


def _update_from_tensor(engine: "EmbeddedEngine") -> Callable[[dict], Any]:
    from glm_rl.engine.engine import deserialize_flattened, deserialize_named_tensors

    def run(body: dict) -> Any:
        payloads = _require(body, "serialized_named_tensors", list)
        load_format = body.get("load_format")
        if load_format not in (None, "flattened_bucket"):
            raise BadRequest(f"load_format: null or 'flattened_bucket' supported, got {load_format!r}")
        if not payloads or not isinstance(payloads[0], str):
            raise BadRequest("serialized_named_tensors: expected a non-empty list of base64 strings")
        if load_format == "flattened_bucket":
            return engine.load_flattened(*deserialize_flattened(payloads[0]), _version(body))
        return engine.load_weights(deserialize_named_tensors(payloads[0]), _version(body))  # tp rank 0's entry
    return run


def _weight_routes(engine: "EmbeddedEngine") -> dict[str, Callable[[dict], Any]]:
    return {
        "/update_weights_from_tensor": _update_from_tensor(engine),
        "/init_weights_update_group": lambda b: engine.init_weight_group(
            master_address=_require(b, "master_address", str), master_port=_require(b, "master_port", int),
            rank_offset=_require(b, "rank_offset", int), world_size=_require(b, "world_size", int),
            group_name=_require(b, "group_name", str), backend=b.get("backend") or "gloo"),
        "/update_weights_from_distributed": lambda b: engine.update_from_distributed(
            names=_require(b, "names", list), dtypes=_require(b, "dtypes", list),
            shapes=_require(b, "shapes", list), group_name=_require(b, "group_name", str),
            weight_version=_version(b)),
        "/destroy_weights_update_group": lambda b: engine.destroy_weight_group(_require(b, "group_name", str)),
        "/weights_checksum": lambda b: engine.checksums(b.get("names")),
        "/p2p/prepare": lambda b: engine.p2p.prepare(_require(b, "tensors", list), _require(b, "buffer_bytes", int),
                                                     b.get("protocol") or "tcp"),
        "/p2p/commit": lambda b: engine.p2p.commit(_version(b)),
        "/p2p/close": lambda b: engine.p2p.close(),
        "/pause_generation": lambda b: engine.pause(b.get("mode") or "abort"),
        "/continue_generation": lambda b: engine.resume(),
        "/release_memory_occupation": lambda b: engine.set_memory_released(True),
        "/resume_memory_occupation": lambda b: engine.set_memory_released(False),
    }


def _generate_handler(engine: "EmbeddedEngine"):
    async def generate(request: web.Request) -> web.Response:
        requests, batched = parse_generate(await _json_body(request), engine)
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in engine.submit(requests)))
        return web.json_response(results if batched else results[0])
    return generate


def _health_generate_handler(engine: "EmbeddedEngine"):
    async def health_generate(request: web.Request) -> web.Response:
        if engine.server_info()["paused"]:
            return web.Response(text="paused")
        probe = GenerationRequest(rid=f"HEALTH_CHECK_{uuid.uuid4().hex}", input_ids=(0,),
                                  sampling=SamplingParams(temperature=0.0, max_new_tokens=1), seed=0)
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


def build_app(engine: "EmbeddedEngine", config: "EngineConfig") -> web.Application:
    app = web.Application(client_max_size=config.max_request_bytes, middlewares=_middlewares(config.api_key))
    def model_info() -> dict[str, Any]:
        return {"model_path": str(config.hf_checkpoint), "tokenizer_path": str(config.hf_checkpoint),
                "is_generation": True, "preferred_sampling_params": None, "weight_version": engine.weight_version}

    for path in ("/server_info", "/get_server_info"):
        app.router.add_get(path, _answer(engine.server_info))
    for path in ("/model_info", "/get_model_info"):
        app.router.add_get(path, _answer(model_info))
    app.router.add_get("/health", _answer(lambda: "OK"))
    app.router.add_get("/health_generate", _health_generate_handler(engine))
    app.router.add_get("/get_load", _answer(engine.load))
    app.router.add_route("*", "/flush_cache", _answer(lambda: "Cache flushed."))  # no prefix cache to flush
    app.router.add_post("/generate", _generate_handler(engine))
    for path, fn in _weight_routes(engine).items():
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

    def __init__(self, engine: "EmbeddedEngine", config: "EngineConfig") -> None:
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
