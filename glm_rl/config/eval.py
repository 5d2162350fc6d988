"""The `eval` section: evaluation during training on the rollout engines, at the current weights.

`--eval-prompt-data NAME PATH [NAME PATH ...]` names each eval set; its metrics are `eval/<NAME>/reward_mean`,
`pass@1`, `pass@<n>` (n = `--n-samples-per-eval-prompt`, unbiased estimator) and `response_len_mean`. Eval runs
before the first step with `--eval-before-train`, then after every `--eval-interval`-th step and after the last.
Unset sampling fields fall back to the rollout section's (temperature, top-p, max response length, reward,
input and label keys); metadata and tool keys are the rollout's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from glm_rl.config.fields import opt


@dataclass(frozen=True)
class EvalConfig:
    eval_prompt_data: tuple[str, ...] = opt(
        (),
        "NAME PATH [NAME PATH ...]: eval sets (JSONL, Parquet or a datasets directory), each named in its "
        "metrics eval/<NAME>/...",
        metavar="NAME PATH",
    )
    eval_interval: int | None = opt(
        None, "evaluate after every N-th step and after the last (needs --eval-prompt-data)"
    )
    eval_before_train: bool = opt(False, "also evaluate the starting weights (logged at step 0)")
    n_samples_per_eval_prompt: int = opt(1, "responses per eval prompt (pass@k uses k = this)")
    eval_temperature: float | None = opt(None, "eval sampling temperature (default: --rollout-temperature)")
    eval_top_p: float | None = opt(None, "eval nucleus sampling (default: --rollout-top-p)")
    eval_max_response_len: int | None = opt(None, "eval max new tokens (default: --rollout-max-response-len)")
    eval_rm_type: str | None = opt(None, "eval reward, a rule grader or remote_rm (default: the training reward)")
    eval_input_key: str | None = opt(None, "eval sets' prompt field (default: --input-key)")
    eval_label_key: str | None = opt(None, "eval sets' label field (default: --label-key)")

    @property
    def sets(self) -> list[tuple[str, str]]:
        """(name, path) of each eval set, in flag order."""
        data = self.eval_prompt_data
        return [(data[i], data[i + 1]) for i in range(0, len(data) - 1, 2)]

    @property
    def enabled(self) -> bool:
        return bool(self.eval_prompt_data)

    def due(self, step: int, num_rollout: int) -> bool:
        """Whether to evaluate once `step` steps have been trained (0: before the first step)."""
        if not self.enabled:
            return False
        if step == 0:
            return self.eval_before_train
        return step == num_rollout or (self.eval_interval is not None and step % self.eval_interval == 0)

    def data_args(self, rollout) -> dict[str, Any]:
        """`load_prompts` keyword arguments for the eval sets (`rollout`: the RolloutConfig)."""
        args = rollout.data_args()
        args["prompt_key"] = self.eval_input_key or rollout.input_key
        args["label_key"] = self.eval_label_key or rollout.label_key
        args["split"] = None
        return args

    def errors(self, rollout) -> list[str]:
        """Flags and eval files (read now, so a bad row fails before any process starts)."""
        from glm_rl.rollout.data import DataError, load_prompts
        from glm_rl.rollout.rewards import reward_option_errors

        data, errors = self.eval_prompt_data, []
        if len(data) % 2:
            errors.append(f"--eval-prompt-data takes NAME PATH pairs (got {len(data)} words: {' '.join(data)})")
        names = [name for name, _ in self.sets]
        for name in names:
            if not name or "/" in name or names.count(name) > 1:
                errors.append(f"--eval-prompt-data: eval set name {name!r} must be unique, non-empty, without '/'")
        for name, value in (
            ("--eval-interval", self.eval_interval),
            ("--n-samples-per-eval-prompt", self.n_samples_per_eval_prompt),
            ("--eval-max-response-len", self.eval_max_response_len),
        ):
            if value is not None and value < 1:
                errors.append(f"{name} must be >= 1 (got {value})")
        if not self.enabled and (self.eval_interval is not None or self.eval_before_train):
            errors.append("--eval-interval / --eval-before-train need --eval-prompt-data NAME PATH")
        if self.eval_rm_type is not None:
            url = rollout.rm_url if self.eval_rm_type == "remote_rm" else None  # the training reward server's
            errors += [f"--eval-rm-type: {e}" for e in reward_option_errors(self.eval_rm_type, rm_url=url)]
        for _, path in self.sets:
            try:
                load_prompts(path, **self.data_args(rollout))
            except DataError as e:
                errors.append(f"--eval-prompt-data: {e}")
        return errors
