"""The `rollout` section: prompt data, rewards, sampling, dynamic sampling, rollout hooks, and the engines behind
the router (embedded or SGLang).

Flag names are slime's, so its scripts carry over: `--input-key`, `--label-key`, `--rm-type`, `--rm-url`,
`--custom-rm-path`, `--over-sampling-batch-size`, `--dynamic-sampling-filter-path`,
`--custom-generate-function-path`, `--rollout-function-path`. `errors()` checks what this section alone can
(reward options, dotted paths that must import, dynamic-sampling sizes), naming each flag and value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from glm_rl.config.fields import opt
from glm_rl.models.glm45.presets import TINY_CHECKPOINT

TINY_DATA = TINY_CHECKPOINT.parent / "arith"
BUILTIN_FILTERS = ("check_reward_nonzero_std",)  # short names of glm_rl.rollout.filters' functions


@dataclass(frozen=True)
class RolloutConfig:
    prompt_data: str = opt(
        str(TINY_DATA / "train.jsonl"),
        "prompts: a JSONL file, a Parquet file, or a directory saved by HF datasets (save_to_disk)",
    )
    input_key: str = opt("prompt", "the prompt's field (dotted for nested): a string, or a list of chat messages")
    label_key: str = opt("label", "the label's field (dotted for nested, e.g. reward_model.ground_truth)")
    metadata_key: str = opt("metadata", "the field of per-row metadata (an object); it reaches the reward function")
    tool_key: str = opt("tools", "the field of per-row tool schemas, handed to the chat template")
    prompt_data_split: str | None = opt(None, "the split of a datasets directory that holds several")
    apply_chat_template: bool = opt(
        True,
        "render prompts with the checkpoint's chat template (a string is one user "
        "turn); --no-apply-chat-template sends a string prompt's tokens verbatim "
        "and refuses chat-message prompts",
    )
    rm_type: str = opt(
        "arithmetic",
        "reward: a rule grader (arithmetic, math, dapo, deepscaler, f1, random, "
        "boxed_<grader>) or remote_rm (with --rm-url)",
    )
    rm_url: str | None = opt(None, "--rm-type remote_rm: the reward server's URL (POST a sample or a group)")
    reward_key: str = opt("reward", "remote_rm: the key of the reward in an object reply")
    group_rm: bool = opt(
        False, "score each group (the samples of one prompt) in one call: remote_rm or --custom-rm-path"
    )
    custom_rm_path: str | None = opt(None, "module.fn: a custom reward function (sync or async; wins over --rm-type)")
    rm_max_concurrency: int = opt(64, "remote_rm: requests in flight at most")
    rm_timeout_s: float = opt(30.0, "remote_rm: seconds per attempt")
    rm_max_retries: int = opt(3, "remote_rm: retries after a timeout, a connection error or HTTP 5xx / 429")
    rm_math_timeout_s: float = opt(5.0, "math graders: time limit of one symbolic comparison")
    rollout_batch_size: int = opt(16, "prompts (groups) trained per rollout step")
    n_samples_per_prompt: int = opt(8, "responses sampled per prompt (the GRPO group)")
    over_sampling_batch_size: int | None = opt(
        None,
        "dynamic sampling: prompts launched per round (>= --rollout-batch-size; default: "
        "--rollout-batch-size); rounds go on until --rollout-batch-size groups pass the filter, then the "
        "surplus in flight is aborted",
    )
    dynamic_sampling_filter_path: str | None = opt(
        None,
        "dynamic sampling: module.fn(rollout_config, samples) -> bool keeps a group; built in: "
        "check_reward_nonzero_std (DAPO: drop groups whose rewards are all equal)",
    )
    custom_generate_function_path: str | None = opt(
        None,
        "module.fn: async fn(ctx, sample, sampling_params) -> Sample | list[Sample] replaces the single "
        "/generate call per sample (glm_rl/rollout/hooks.py); the framework then rewards the result",
    )
    rollout_function_path: str | None = opt(
        None,
        "module.fn: async fn(ctx, step) -> list[Sample] replaces the whole rollout step (batching and "
        "rewards included)",
    )
    rollout_max_response_len: int = opt(16, "max new tokens per response")
    rollout_max_prompt_len: int = opt(64, "prompts longer than this (in tokens) are skipped and counted")
    rollout_temperature: float = opt(1.0, "sampling temperature")
    rollout_top_p: float = opt(1.0, "nucleus sampling")
    rollout_top_k: int = opt(-1, "top-k sampling (-1 = off)")
    rollout_shuffle: bool = opt(True, "shuffle prompts each epoch")
    num_engines: int = opt(2, "rollout engines behind the router")
    engine_api_key: str | None = opt(None, "API key engines require (Bearer token)")
    enable_mtp: bool = opt(
        False,
        "MTP speculative decoding: draft with the checkpoint's MTP layer, verify in one "
        "forward (distribution-exact); SGLang: EAGLE flags, topk 1",
    )
    speculative_num_steps: int = opt(
        1,
        "with --enable-mtp: MTP draft tokens per verify forward "
        "(SGLang's --speculative-num-steps; num-draft-tokens = steps + 1)",
    )
    rollout_engine: Literal["embedded", "sglang"] = opt(
        "embedded", "embedded: our torch engine (CPU, tests); sglang: SGLang 0.5.23 servers (GPU)"
    )
    rollout_num_gpus_per_engine: int = opt(1, "GPUs per SGLang engine (its --tp-size)")
    max_running_requests: int | None = opt(
        None,
        "most sequences an engine decodes at once (SGLang's --max-running-requests; None: sized from free GPU "
        "memory (SGLang and the embedded engine), 64 on CPU)",
    )
    sglang_args: tuple[tuple[str, str | None], ...] = field(
        default=(),
        metadata={"help": "--sglang-<flag> [value]: passed to SGLang's launch_server as --<flag>", "cli": False},
    )

    @property
    def dynamic_sampling(self) -> bool:
        return self.dynamic_sampling_filter_path is not None or self.over_sampling_batch_size is not None

    @property
    def launch_batch_size(self) -> int:
        """Prompts launched per sampling round."""
        return self.over_sampling_batch_size or self.rollout_batch_size

    def data_args(self) -> dict[str, Any]:
        """Keyword arguments of `glm_rl.rollout.data.load_prompts` for --prompt-data and any other prompt file."""
        return {
            "prompt_key": self.input_key,
            "label_key": self.label_key,
            "metadata_key": self.metadata_key,
            "tool_key": self.tool_key,
            "apply_chat_template": self.apply_chat_template,
            "split": self.prompt_data_split,
        }

    def rewarder_args(self) -> dict[str, Any]:
        """Keyword arguments of `glm_rl.rollout.rewards.build_rewarder` (after `rm_type`)."""
        return {
            "rm_url": self.rm_url,
            "custom_rm_path": self.custom_rm_path,
            "group_rm": self.group_rm,
            "reward_key": self.reward_key,
            "max_concurrency": self.rm_max_concurrency,
            "timeout_s": self.rm_timeout_s,
            "max_retries": self.rm_max_retries,
            "math_timeout_s": self.rm_math_timeout_s,
        }

    def errors(self) -> list[str]:
        """Rewards, dynamic sampling and hooks; each problem names its flag and value (dotted paths are imported
        now, so one that does not import fails before any process starts)."""
        from glm_rl.rollout.rewards import is_rule, reward_option_errors
        from glm_rl.rollout.rewards.custom import CustomRewardError, load_function
        from glm_rl.rollout.rewards.rule import unknown_rm_type_message

        if not (self.custom_rm_path or self.rm_type == "remote_rm" or is_rule(self.rm_type)):
            valid = unknown_rm_type_message(self.rm_type).split("; ", 1)[1]  # "valid: ...; boxed_ ...; remote_rm"
            errors = [f"--rm-type {self.rm_type!r} unknown; {valid}"]
        else:
            errors = reward_option_errors(
                self.rm_type, rm_url=self.rm_url, custom_rm_path=self.custom_rm_path, group_rm=self.group_rm
            )
        for name, value in (
            ("--rm-max-concurrency", self.rm_max_concurrency),
            ("--rm-timeout-s", self.rm_timeout_s),
            ("--rm-math-timeout-s", self.rm_math_timeout_s),
        ):
            if value <= 0:
                errors.append(f"{name} must be > 0 (got {value})")
        if self.rm_max_retries < 0:
            errors.append(f"--rm-max-retries must be >= 0 (got {self.rm_max_retries})")
        over = self.over_sampling_batch_size
        if over is not None and over < self.rollout_batch_size:
            errors.append(
                f"--over-sampling-batch-size {over} must be >= --rollout-batch-size {self.rollout_batch_size}"
            )
        paths = [
            ("--custom-generate-function-path", self.custom_generate_function_path),
            ("--rollout-function-path", self.rollout_function_path),
        ]
        if self.dynamic_sampling_filter_path not in BUILTIN_FILTERS:
            paths.append(("--dynamic-sampling-filter-path", self.dynamic_sampling_filter_path))
        for flag, path in paths:
            if path:
                try:
                    load_function(path, flag)
                except CustomRewardError as e:
                    errors.append(str(e))
        if self.rollout_function_path and (self.dynamic_sampling or self.custom_generate_function_path):
            errors.append(
                "--rollout-function-path replaces the whole rollout step: drop --over-sampling-batch-size,"
                " --dynamic-sampling-filter-path and --custom-generate-function-path"
            )
        return errors
