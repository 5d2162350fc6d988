"""The `agentic` section: the built-in multi-turn tool loop (glm_rl/rollout/agentic/), its tool sandbox, and
OpenAI-API agents run over chat sessions (`--custom-agent-function-path`).

Read by `glm_rl.rollout.agentic.tool_loop.generate` and `glm_rl.rollout.agentic.openai_agent.generate` (both
`--custom-generate-function-path` hooks) through the `GenerateContext`. Checks run at construction, naming the
flag and value (`--max-turns 0` is refused: an episode has at least the first model turn; an agent path must
import now, not mid-run).
"""

from __future__ import annotations

from dataclasses import dataclass

from glm_rl.config.fields import opt


@dataclass(frozen=True)
class AgenticConfig:
    tools_path: str | None = opt(
        None,
        "module.ATTR: the tools of the built-in tool loop, a list of "
        "glm_rl.rollout.agentic.tools.Tool (or a dict name -> Tool)",
    )
    max_turns: int = opt(
        4,
        "most model turns per episode in the tool loop (>= 1); each turn after the first "
        "follows the observation of the previous turn's tool calls",
    )
    rollout_max_context_len: int | None = opt(
        None,
        "most tokens of a whole episode (prompt + every turn + observations); the loop stops (finish "
        "reason length) when the next turn would not fit. None: the model's max_position_embeddings",
    )
    tool_timeout_s: float = opt(5.0, "wall-clock limit of one sandboxed tool run, seconds")
    tool_memory_mb: int = opt(512, "address-space limit (RLIMIT_AS) of one sandboxed tool run, MiB")
    tool_max_output_bytes: int = opt(4096, "a tool's output beyond this many bytes is cut (and says so)")
    custom_agent_function_path: str | None = opt(
        None,
        "module.fn: async fn(client: openai.AsyncOpenAI, sample: SampleInfo) runs one agent episode per sample "
        "against the session server's /v1/chat/completions (it selects the generate hook "
        "glm_rl.rollout.agentic.openai_agent.generate; --max-turns and --rollout-max-context-len apply)",
    )

    def __post_init__(self) -> None:
        errors = self.errors()
        if errors:
            raise ValueError("invalid configuration:\n  " + "\n  ".join(errors))

    def errors(self) -> list[str]:
        """Each problem names its flag and value."""
        errors = []
        if self.max_turns < 1:
            errors.append(f"--max-turns must be >= 1 (got {self.max_turns})")
        if self.rollout_max_context_len is not None and self.rollout_max_context_len < 2:
            errors.append(f"--rollout-max-context-len must be >= 2 (got {self.rollout_max_context_len})")
        if self.tool_timeout_s <= 0:
            errors.append(f"--tool-timeout-s must be > 0 (got {self.tool_timeout_s})")
        if self.tool_memory_mb < 16:
            errors.append(f"--tool-memory-mb must be >= 16 (got {self.tool_memory_mb})")
        if self.tool_max_output_bytes < 1:
            errors.append(f"--tool-max-output-bytes must be >= 1 (got {self.tool_max_output_bytes})")
        if self.tools_path is not None and "." not in self.tools_path.strip("."):
            errors.append(f"--tools-path must be module.ATTR (got {self.tools_path!r})")
        if self.custom_agent_function_path is not None:
            errors += _agent_path_errors(self.custom_agent_function_path)
        return errors


def _agent_path_errors(path: str) -> list[str]:
    """The agent function must import (and the `openai` client with it) before any process starts."""
    import importlib.util

    from glm_rl.rollout.rewards.custom import CustomRewardError, load_function

    flag = "--custom-agent-function-path"
    if importlib.util.find_spec("openai") is None:
        return [f"{flag} {path}: the agent needs the openai package (pip install 'glm-rl[agent]')"]
    try:
        load_function(path, flag)
    except CustomRewardError as e:
        return [str(e)]
    return []
