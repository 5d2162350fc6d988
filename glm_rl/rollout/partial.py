"""Partial rollouts (--partial-rollout): a request cut by a weight update continues under the new weights.

An engine paused with mode "abort" answers its running requests with what they generated so far (finish reason
"abort"). The continuation asks for the rest: the original prompt plus that prefix as input, the remaining token
budget, its own seed and rid. `merge` joins the answers so that the prefix stays exactly what the old weights
produced — ids, their logprobs, their routed experts — and records, per token, the weight version that produced it
(`meta_info["weight_versions"]`, which `SampleGenerator.from_answer` turns into `Sample.token_versions`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

SEED_STRIDE = 7_919  # a continuation's seed: the request's + its segment number x this prime


def continuation(payload: dict[str, Any], segments: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The /generate body that continues `payload` after the answers in `segments` (None: nothing left to
    generate, the budget is spent)."""
    if not segments:
        return payload
    done = [t for seg in segments for t in seg["output_ids"]]
    params = dict(payload["sampling_params"])
    params["max_new_tokens"] = int(params["max_new_tokens"]) - len(done)
    if params["max_new_tokens"] <= 0:
        return None
    if params.get("sampling_seed") is not None:
        params["sampling_seed"] = int(params["sampling_seed"]) + SEED_STRIDE * len(segments)
    rid = payload.get("rid")
    return {
        **payload,
        "input_ids": list(payload["input_ids"]) + done,
        "sampling_params": params,
        **({"rid": f"{rid}+{len(segments)}"} if rid is not None else {}),
    }


def merge(segments: list[dict[str, Any]], finish_if_spent: bool = False) -> dict[str, Any]:
    """One answer from the answers of a request and its continuations (module docstring). `finish_if_spent`:
    the last segment was cut exactly when the budget ran out, so the sample ends as "length"."""
    if len(segments) == 1 and not finish_if_spent:
        return segments[0]
    last = segments[-1]
    meta = dict(last["meta_info"])
    ids: list[int] = []
    logprobs: list = []
    versions: list[int] = []
    routed: list | None = [] if meta.get("routed_experts") is not None else None
    for seg in segments:
        m = seg["meta_info"]
        ids += seg["output_ids"]
        logprobs += m.get("output_token_logprobs", [])
        versions += [int(m.get("weight_version", 0))] * len(seg["output_ids"])
        rows = m.get("routed_experts")
        if routed is not None and rows is not None:  # rows by position: keep the rows earlier segments decided
            routed += list(rows)[len(routed) :]
    meta.update(
        completion_tokens=len(ids),
        output_token_logprobs=logprobs,
        weight_versions=versions,
        weight_version=min(versions, default=int(meta.get("weight_version", 0))),
        partial_segments=len(segments),
    )
    if routed is not None:
        meta["routed_experts"] = np.asarray(routed, dtype=np.int16) if routed else routed
    if finish_if_spent:
        meta["finish_reason"] = {"type": "length", "length": len(ids)}
    return {"text": "".join(seg.get("text", "") for seg in segments), "output_ids": ids, "meta_info": meta}
