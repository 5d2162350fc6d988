"""The `debug` section (slime's names): dump each step's rollout, or train on dumped rollouts without engines.

`--save-debug-rollout-data PATH` writes step N's samples (everything the engines and rewards produced) and rollout
metrics to PATH with `{rollout_id}` replaced by N. `--load-debug-rollout-data PATH` replays them: no engines,
router or rollout manager start, the trainer trains on the saved samples step by step (advantages, old logprobs
and corrections are recomputed), so a saved run's train metrics come back (fp32, CPU) for the same flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from glm_rl.config.fields import opt

PLACEHOLDER = "{rollout_id}"


@dataclass(frozen=True)
class DebugConfig:
    save_debug_rollout_data: str | None = opt(
        None,
        "write each step's rollout to this path; '{rollout_id}' is "
        "replaced by the step (e.g. dumps/rollout_{rollout_id}.pt)",
    )
    load_debug_rollout_data: str | None = opt(
        None, "train only: replay rollouts saved by --save-debug-rollout-data (same template); no engines start"
    )

    def path(self, template: str, step: int) -> Path:
        return Path(template.replace(PLACEHOLDER, str(step)))

    def errors(self, num_rollout: int, evaluating: bool) -> list[str]:
        errors = []
        for flag, template in (
            ("--save-debug-rollout-data", self.save_debug_rollout_data),
            ("--load-debug-rollout-data", self.load_debug_rollout_data),
        ):
            if template is not None and PLACEHOLDER not in template:
                errors.append(f"{flag} {template!r} must contain {PLACEHOLDER} (one file per step)")
        load = self.load_debug_rollout_data
        if load is None or PLACEHOLDER not in load:
            return errors
        if self.save_debug_rollout_data:
            errors.append("--save-debug-rollout-data with --load-debug-rollout-data would re-save what is replayed")
        if evaluating:
            errors.append(
                "--eval-prompt-data needs the rollout engines, which --load-debug-rollout-data does not start"
            )
        missing = [str(self.path(load, s)) for s in range(num_rollout) if not self.path(load, s).is_file()]
        if missing:
            shown = ", ".join(missing[:3]) + (f", … ({len(missing)} in all)" if len(missing) > 3 else "")
            errors.append(f"--load-debug-rollout-data: no saved rollout {shown} (--num-rollout {num_rollout})")
        return errors
