"""The `agentic` section: the built-in multi-turn tool loop (glm_rl/rollout/agentic/) and its tool sandbox.

Read by `glm_rl.rollout.agentic.tool_loop.generate` (a `--custom-generate-function-path` hook) through the
`GenerateContext`. Checks run at construction, naming the flag and value (`--max-turns 0` is refused: an
episode has at least the first model turn).
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
        return errors
