"""Client side of the engine HTTP API (SGLang's native API; our embedded engine speaks the same subset).

- `EngineClient`: sync calls (urllib, no extra dependency) mirroring the endpoints, and `agenerate` (aiohttp)
  for many concurrent /generate requests from a rollout manager.
- `generate_payload`: the /generate body.
Weight payloads are encoded by `glm_rl.weights.wire` (the engine decodes them with the same module): an engine
whose /server_info names our `weight_wire` format gets it (its buffers by reference when the engine has an API
key, which this client then sends; else inline bytes), anything else (SGLang) its pickled form. The
`update_weights_from_distributed` group is `glm_rl.weights.group`.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any

import torch

from glm_rl.weights.wire import (
    FORMAT,
    encode_flattened,
    encode_named_tensors,
    serialize_flattened,
    serialize_named_tensors,
)


class EngineError(RuntimeError):
    """An engine answered with an HTTP error (status and the engine's message) or could not be reached."""

    def __init__(self, url: str, status: int | None, message: str) -> None:
        super().__init__(f"{url}: HTTP {status}: {message}" if status else f"{url}: {message}")
        self.url, self.status, self.message = url, status, message


def generate_payload(
    input_ids: list[int] | list[list[int]],
    sampling_params: dict[str, Any] | None = None,
    *,
    return_logprob: bool = False,
    return_routed_experts: bool = False,
    rid: str | list[str] | None = None,
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "input_ids": input_ids,
        "sampling_params": dict(sampling_params or {}),
        "return_logprob": return_logprob,
    }
    if return_routed_experts:
        payload["return_routed_experts"] = True
    if rid is not None:
        payload["rid"] = rid
    return payload


class EngineClient:
    """Talks to one engine (or a router) at `url`."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0) -> None:
        self.url, self.api_key, self.timeout = url.rstrip("/"), api_key, timeout
        self._wire: tuple[bool, bool] | None = None  # (our JSON format?, by reference?), asked once

    def weight_wire(self) -> tuple[bool, bool]:
        """(whether the engine takes `glm_rl.weights.wire.FORMAT`, whether by reference), from /server_info;
        an engine that does not say so (SGLang, or no answer) gets SGLang's pickled form."""
        if self._wire is not None:
            return self._wire
        try:
            info = self.server_info()
        except EngineError as e:
            if e.status is None:  # unreachable: ask again next time
                return False, False
            info = None
        wire = info.get("weight_wire") if isinstance(info, dict) else None
        ours = isinstance(wire, dict) and wire.get("format") == FORMAT
        self._wire = (ours, bool(ours and wire.get("by_reference") and self.api_key))
        return self._wire

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One HTTP call; JSON answer (or text), EngineError on HTTP errors / unreachable engine."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=self._headers())
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise EngineError(self.url + path, e.code, _error_message(e.read())) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            raise EngineError(self.url + path, None, f"unreachable: {e}") from None
        return _decode(raw)

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.request("POST", path, body or {})

    # endpoints
    def generate(
        self,
        input_ids,
        sampling_params=None,
        return_logprob: bool = False,
        return_routed_experts: bool = False,
        rid=None,
    ) -> Any:
        return self.post(
            "/generate",
            generate_payload(
                input_ids,
                sampling_params,
                return_logprob=return_logprob,
                return_routed_experts=return_routed_experts,
                rid=rid,
            ),
        )

    async def agenerate(
        self,
        input_ids,
        sampling_params=None,
        return_logprob: bool = False,
        return_routed_experts: bool = False,
        rid=None,
        *,
        session=None,
    ) -> Any:
        payload = generate_payload(
            input_ids,
            sampling_params,
            return_logprob=return_logprob,
            return_routed_experts=return_routed_experts,
            rid=rid,
        )
        return await self.apost("/generate", payload, session=session)

    async def apost(self, path: str, body: dict[str, Any], *, session=None) -> Any:
        """POST with aiohttp; pass a shared `aiohttp.ClientSession` when issuing many requests."""
        import aiohttp

        if session is None:
            async with aiohttp.ClientSession() as own:
                return await self.apost(path, body, session=own)
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with session.post(self.url + path, json=body, headers=self._headers(), timeout=timeout) as resp:
            raw = await resp.read()
            if resp.status >= 400:
                raise EngineError(self.url + path, resp.status, _error_message(raw))
            return _decode(raw)

    def health(self) -> bool:
        try:
            self.get("/health")
            return True
        except EngineError:
            return False

    def health_generate(self) -> bool:
        try:
            self.get("/health_generate")
            return True
        except EngineError:
            return False

    def server_info(self) -> dict[str, Any]:
        return self.get("/server_info")

    def model_info(self) -> dict[str, Any]:
        return self.get("/model_info")

    def get_load(self) -> Any:
        return self.get("/get_load")

    def pause(self, mode: str = "abort") -> Any:
        return self.post("/pause_generation", {"mode": mode})

    def resume(self) -> Any:
        return self.post("/continue_generation")

    def flush_cache(self) -> Any:
        return self.post("/flush_cache")

    def release_memory_occupation(self, tags: list[str] | None = None) -> Any:
        return self.post("/release_memory_occupation", {} if tags is None else {"tags": tags})

    def resume_memory_occupation(self, tags: list[str] | None = None) -> Any:
        return self.post("/resume_memory_occupation", {} if tags is None else {"tags": tags})

    def update_weights_from_tensor(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        weight_version: int | None = None,
        flush_cache: bool = True,
    ) -> Any:
        ours, by_reference = self.weight_wire()
        payload = (
            encode_named_tensors(named_tensors, by_reference=by_reference)
            if ours
            else serialize_named_tensors(named_tensors)
        )
        return self.post(
            "/update_weights_from_tensor",
            {
                "serialized_named_tensors": [payload],
                "load_format": None,
                "flush_cache": flush_cache,
                "weight_version": weight_version,
            },
        )

    def update_weights_from_flat(
        self, flat: torch.Tensor, layout: list[list], weight_version: int | None = None, flush_cache: bool = True
    ) -> Any:
        """The whole model as one shared buffer (`load_format` "flattened_bucket"; layout from
        `glm_rl.weights.flat.entries_to_json`). Keep `flat` alive until the engine has answered."""
        ours, by_reference = self.weight_wire()
        payload = (
            encode_flattened(flat, layout, by_reference=by_reference) if ours else serialize_flattened(flat, layout)
        )
        return self.post(
            "/update_weights_from_tensor",
            {
                "serialized_named_tensors": [payload],
                "load_format": "flattened_bucket",
                "flush_cache": flush_cache,
                "weight_version": weight_version,
            },
        )

    def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str = "gloo",
    ) -> Any:
        """Blocks until every rank (the trainer's rank 0 too) has joined: call it from a thread."""
        return self.post(
            "/init_weights_update_group",
            {
                "master_address": master_address,
                "master_port": master_port,
                "rank_offset": rank_offset,
                "world_size": world_size,
                "group_name": group_name,
                "backend": backend,
            },
        )

    def update_weights_from_distributed(
        self,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str,
        weight_version: int | None = None,
        flush_cache: bool = True,
    ) -> Any:
        """Blocks until the trainer has broadcast every tensor, in order: call it from a thread."""
        return self.post(
            "/update_weights_from_distributed",
            {
                "names": names,
                "dtypes": [str(d).removeprefix("torch.") for d in dtypes],
                "shapes": [list(s) for s in shapes],
                "group_name": group_name,
                "flush_cache": flush_cache,
                "weight_version": weight_version,
            },
        )

    def destroy_weights_update_group(self, group_name: str) -> Any:
        return self.post("/destroy_weights_update_group", {"group_name": group_name})

    def weights_checksum(self, names: list[str] | None = None, algo: str = "sha256") -> dict[str, Any]:
        body: dict[str, Any] = {} if algo == "sha256" else {"algo": algo}  # SGLang-shaped body by default
        return self.post("/weights_checksum", body if names is None else body | {"names": names})


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def _error_message(raw: bytes) -> str:
    body = _decode(raw)
    return str(body.get("message", body)) if isinstance(body, dict) else str(body)
