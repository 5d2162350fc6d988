"""Request parsing for the embedded engine's HTTP front: JSON bodies in, validated `GenerationRequest`s out.

Why apart from the server: parsing is pure (no aiohttp, no engine), so every check names the offending field
(`BadRequest` → HTTP 400, or the status it carries) and can be read and tested on its own. Semantics follow
SGLang's /generate: `input_ids` one prompt or a batch of them (text prompts are not supported), per-row or shared
`sampling_params` and `rid`, unset max_new_tokens = 128 clipped to the context, and a request's seed from its
`sampling_seed`, else its `rid`, else a fresh key (`batch.request_seed`). Sampling numbers must be finite and in
SGLang's ranges (NaN / Infinity, which Python's JSON reads, are refused by name), and a body nests at most
`MAX_JSON_DEPTH` containers deep (a deeper one is a 400, never the decoder's RecursionError).
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable
from typing import Any

from glm_rl.engine.batch import GenerationRequest, SamplingParams, request_seed
from glm_rl.engine.config import EngineConfig


class BadRequest(ValueError):
    """Input the engine refuses; answered with `status` (400 unless given) and the message, which names the field."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# -- bodies ----------------------------------------------------------------------------------------------------
MAX_JSON_DEPTH = 32  # containers nested in a request body; ours need 4 (deeper answers 400, never a RecursionError)


def parse_json_body(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict:
    """A request body: one JSON object ({} for an empty body) nested at most `max_depth` deep. (Its size is
    capped before this, by the server: `EngineConfig.max_request_bytes` → 413.)"""
    if not raw.strip():
        return {}
    too_deep = BadRequest(f"body: JSON nested deeper than {max_depth} levels")
    try:
        body = json.loads(raw)
    except RecursionError:  # the C decoder stops at the interpreter's recursion limit, safely
        raise too_deep from None
    except ValueError as e:
        raise BadRequest(f"body: malformed JSON ({e})") from None
    if not isinstance(body, dict):
        raise BadRequest("body: expected a JSON object")
    if raw.count(b"[") + raw.count(b"{") > max_depth and not _depth_within(body, max_depth):
        raise too_deep
    return body


def _depth_within(obj: dict | list, limit: int) -> bool:
    """Whether parsed JSON nests at most `limit` containers deep; level by level, without recursion (a list of
    scalars, e.g. token ids, costs one C-level pass)."""
    level, depth = [obj], 1
    while level:
        if depth > limit:
            return False
        deeper = []
        for o in level:
            items = list(o.values()) if isinstance(o, dict) else o
            kinds = set(map(type, items))
            if list in kinds or dict in kinds:
                deeper.extend(x for x in items if isinstance(x, (list, dict)))
        level, depth = deeper, depth + 1
    return True


# -- fields ----------------------------------------------------------------------------------------------------
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _field(d: dict, key: str, default: Any, kind: str, where: str) -> Any:
    value = d.get(key)
    if value is None:
        return default
    ok = {
        "int": _is_int(value),
        "bool": isinstance(value, bool),
        "number": (_is_int(value) or isinstance(value, float)),
    }[kind]
    if not ok:
        raise BadRequest(f"{where}{key}: expected {kind}, got {value!r}")
    return value


def _float(d: dict, key: str, default: float, where: str) -> float:
    value = _field(d, key, default, "number", where)
    try:
        return float(value)
    except OverflowError:  # an int too large for a float
        raise BadRequest(f"{where}{key}: must be finite, got an integer of {len(str(value))} digits") from None


def _check_ids(ids: Any, where: str, vocab_size: int, allow_empty: bool = False) -> tuple[int, ...]:
    if not isinstance(ids, list) or (not ids and not allow_empty):
        raise BadRequest(f"{where}: expected a non-empty list of token ids")
    for i, t in enumerate(ids):
        if not _is_int(t):
            raise BadRequest(f"{where}[{i}]: expected int token id, got {t!r}")
        if not 0 <= t < vocab_size:
            raise BadRequest(f"{where}[{i}]: token id {t} outside the vocabulary [0, {vocab_size})")
    return tuple(ids)


def parse_sampling(sp: Any, where: str, vocab_size: int, default_max_new: int) -> tuple[SamplingParams, int | None]:
    """SamplingParams and the optional `sampling_seed` from a JSON sampling_params object."""
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise BadRequest(f"{where}: expected an object")
    w = f"{where}."
    temperature = _float(sp, "temperature", 1.0, w)
    top_p = _float(sp, "top_p", 1.0, w)
    max_new = _field(sp, "max_new_tokens", default_max_new, "int", w)
    top_k = _field(sp, "top_k", -1, "int", w)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise BadRequest(f"{w}temperature: must be a finite number >= 0, got {temperature}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise BadRequest(f"{w}top_p: must be in (0, 1], got {top_p}")
    if top_k != -1 and top_k < 1:
        raise BadRequest(f"{w}top_k: must be -1 (off) or >= 1, got {top_k}")
    if max_new <= 0:
        raise BadRequest(f"{w}max_new_tokens: must be >= 1, got {max_new}")
    stop = sp.get("stop_token_ids")
    stop_ids = () if stop is None else _check_ids(stop, f"{w}stop_token_ids", vocab_size, allow_empty=True)
    params = SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new,
        stop_token_ids=stop_ids,
        ignore_eos=_field(sp, "ignore_eos", False, "bool", w),
        skip_special_tokens=_field(sp, "skip_special_tokens", True, "bool", w),
    )
    return params, _field(sp, "sampling_seed", None, "int", w)


def _per_row(value: Any, n: int, batched: bool, name: str) -> list[Any]:
    if not batched:
        return [value]
    if isinstance(value, list):
        if len(value) != n:
            raise BadRequest(f"{name}: list of {len(value)} for a batch of {n}")
        return value
    return [value] * n


def parse_generate(
    body: dict, config: EngineConfig, *, vocab_size: int, max_total_len: int, next_key: Callable[[], str]
) -> tuple[list[GenerationRequest], bool]:
    """Validated requests (one per prompt) and whether the input was a batch. `next_key`: a fresh seed key for
    a request that names neither `sampling_seed` nor `rid`."""
    if body.get("stream"):
        raise BadRequest("stream: streaming is not supported by this engine")
    ids = body.get("input_ids")
    if ids is None:
        raise BadRequest("input_ids: required (text prompts are not supported)")
    batched = isinstance(ids, list) and bool(ids) and all(isinstance(x, list) for x in ids)
    prompts = ids if batched else [ids]
    if len(prompts) > config.max_batch_size:
        raise BadRequest(f"input_ids: batch of {len(prompts)} over the limit {config.max_batch_size}")
    sps = _per_row(body.get("sampling_params"), len(prompts), batched, "sampling_params")
    rids = _per_row(body.get("rid"), len(prompts), batched, "rid")
    flags = {
        "return_logprob": _field(body, "return_logprob", False, "bool", ""),
        "return_routed_experts": _field(
            body, "return_routed_experts", config.return_routed_experts_by_default, "bool", ""
        ),
    }
    if flags["return_routed_experts"] and not config.record_routed_experts:
        raise BadRequest("return_routed_experts: this engine runs with record_routed_experts=False")
    out = []
    for i, (prompt, sp, rid) in enumerate(zip(prompts, sps, rids)):
        where = f"[{i}]" if batched else ""
        tokens = _check_ids(prompt, f"input_ids{where}", vocab_size)
        room = max_total_len - len(tokens)  # unset max_new_tokens: SGLang's 128, clipped to the context
        if room < 1:
            raise BadRequest(
                f"input_ids{where}: prompt of {len(tokens)} tokens leaves no room under the context "
                f"limit {max_total_len}"
            )
        sampling, seed = parse_sampling(sp, f"sampling_params{where}", vocab_size, min(128, room))
        if len(tokens) + sampling.max_new_tokens > max_total_len:
            raise BadRequest(
                f"sampling_params{where}.max_new_tokens: prompt ({len(tokens)}) + max_new_tokens "
                f"({sampling.max_new_tokens}) exceeds the context limit {max_total_len}"
            )
        if rid is not None and not isinstance(rid, str):
            raise BadRequest(f"rid{where}: expected a string, got {rid!r}")
        key = (
            (("seed", seed, i) if batched else ("seed", seed))
            if seed is not None
            else (("rid", rid) if rid is not None else next_key())
        )
        out.append(
            GenerationRequest(
                rid=rid or uuid.uuid4().hex,
                input_ids=tokens,
                sampling=sampling,
                seed=request_seed(config.seed, key),
                **flags,
            )
        )
    return out, batched


# -- weight routes' fields --------------------------------------------------------------------------------------
def require(body: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    """body[key], which must be there and of `kind` (a bool is no int)."""
    if key not in body:
        raise BadRequest(f"{key}: required")
    if not isinstance(body[key], kind) or isinstance(body[key], bool) and kind is not bool:
        raise BadRequest(f"{key}: expected {getattr(kind, '__name__', kind)}, got {body[key]!r}")
    return body[key]


def parse_version(body: dict) -> int | None:
    """body["weight_version"] as an int, or None."""
    v = body.get("weight_version")
    if v is None:
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        raise BadRequest(f"weight_version: expected an integer, got {v!r}") from None
