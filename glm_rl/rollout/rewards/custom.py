"""Custom reward functions (`--custom-rm-path package.module.function`), loaded by dotted path.

Contract (the same as the rule graders', so a built-in grader's path works too):
- per sample: `fn(response, label, metadata) -> float`
- per group (`--group-rm`): `fn(responses, label, metadata) -> list[float]` (the samples of one prompt)
Either may be `async def`. A function with a `prompt` parameter (or `**kwargs`) also gets `prompt=` (the row's
prompt, text or chat messages). Sync functions run on a worker thread, so a slow one does not stall the event
loop. Loading fails with an error naming the path and what went wrong (module not importable, no such
attribute, not callable).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Callable
from typing import Any


class CustomRewardError(ValueError):
    """A custom reward path that cannot be used; the message names the path and the module."""


def load_function(path: str, flag: str = "--custom-rm-path") -> Callable[..., Any]:
    """The callable at `package.module.function` (or `package.module:function`)."""
    module_name, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr or not sep:
        raise CustomRewardError(f"{flag} {path!r}: expected 'package.module.function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CustomRewardError(f"{flag} {path!r}: cannot import module {module_name!r} ({e})") from e
    except Exception as e:  # the module exists but raised while importing
        raise CustomRewardError(f"{flag} {path!r}: importing module {module_name!r} raised {e!r}") from e
    if not hasattr(module, attr):
        raise CustomRewardError(f"{flag} {path!r}: module {module_name!r} has no attribute {attr!r}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise CustomRewardError(f"{flag} {path!r}: {type(fn).__name__} object is not callable")
    return fn


def accepts_prompt(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "prompt" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Await an async function; run a sync one on a worker thread (awaiting what it returns, if awaitable)."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    result = await asyncio.to_thread(fn, *args, **kwargs)
    return await result if inspect.isawaitable(result) else result
