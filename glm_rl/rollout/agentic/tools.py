"""Python tools for the tool loop: `Tool`, the registry (`--tools-path module.ATTR`), and two built-ins.

A tool is a name, a description, a JSON schema of its arguments (what the chat template declares in the system
turn, OpenAI's `{"type": "function", "function": {...}}` shape) and a function called with the parsed
arguments as keywords, returning text (sync or async; sync ones run in a worker thread so they cannot stall
the rollout's event loop). A tool that runs code sets `sandboxed=True` and receives `limits=SandboxLimits`
from the run's config (`--tool-timeout-s`, `--tool-memory-mb`, `--tool-max-output-bytes`).

`call_tool` never raises: an unknown tool, wrong arguments or an exception inside the tool become the
observation text the model reads (`error: …`).

Built-ins: `CALCULATOR` (arithmetic on integers and floats, evaluated from the AST: no eval) and `PYTHON`
(code run by `sandbox.run_python`).
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from glm_rl.rollout.agentic.glm45_format import ToolCall
from glm_rl.rollout.agentic.sandbox import SandboxLimits, run_python


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    fn: Callable[..., Any]
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})
    sandboxed: bool = False  # fn takes `limits: SandboxLimits`

    def schema(self) -> dict:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


def as_registry(tools: Any, where: str) -> dict[str, Tool]:
    """A list of Tools or a dict name → Tool, checked (names unique, each a Tool)."""
    items = list(tools.values()) if isinstance(tools, dict) else tools
    if not isinstance(items, (list, tuple)) or not all(isinstance(t, Tool) for t in items):
        raise TypeError(
            f"{where}: expected a list of glm_rl.rollout.agentic.tools.Tool or a dict name -> Tool, "
            f"got {type(tools).__name__}"
        )
    registry = {t.name: t for t in items}
    if len(registry) != len(items):
        raise ValueError(f"{where}: tool names repeat: {[t.name for t in items]}")
    return registry


def load_tools(path: str) -> dict[str, Tool]:
    """`module.ATTR` → the registry (an import error names the path)."""
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        tools = getattr(module, attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--tools-path {path}: cannot load ({type(e).__name__}: {e})") from e
    return as_registry(tools, f"--tools-path {path}")


async def call_tool(registry: dict[str, Tool], call: ToolCall, limits: SandboxLimits) -> str:
    """The observation text of one call (never raises)."""
    tool = registry.get(call.name)
    if tool is None:
        return f"error: unknown tool {call.name!r}; available: {', '.join(sorted(registry)) or 'none'}"
    kwargs = dict(call.arguments)
    if tool.sandboxed:
        kwargs["limits"] = limits
    try:
        if inspect.iscoroutinefunction(tool.fn):
            result = await tool.fn(**kwargs)
        else:
            result = await asyncio.to_thread(tool.fn, **kwargs)
    except TypeError as e:
        return f"error: bad arguments for {call.name}: {e}"
    except Exception as e:  # the tool's own failure is the model's observation
        return f"error: {call.name} raised {type(e).__name__}: {e}"
    return str(result)


# -- built-ins -------------------------------------------------------------------------------------------------
_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        return _OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    raise ValueError(f"unsupported expression {ast.unparse(node)!r}")


def calculate(expression: Any) -> str:
    """Value of an arithmetic expression (+ - * / // % ** and parentheses)."""
    text = str(expression)
    if len(text) > 200:
        raise ValueError("expression longer than 200 characters")
    value = _eval(ast.parse(text, mode="eval").body)
    return str(int(value) if isinstance(value, float) and value.is_integer() else value)


async def python_code(code: Any, limits: SandboxLimits) -> str:
    return (await run_python(str(code), limits)).observation(limits)


CALCULATOR = Tool(
    "calculator",
    "Evaluate an arithmetic expression such as 12*34.",
    calculate,
    {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
)
PYTHON = Tool(
    "python",
    "Run Python code in a sandbox (no network, time and memory limits); returns its output.",
    python_code,
    {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
    sandboxed=True,
)
TOOLS = [CALCULATOR, PYTHON]
