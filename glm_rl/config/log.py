"""The `log` section: where step metrics go besides <output-dir>/metrics.jsonl, the console and the PNG report —
TensorBoard scalars and Weights & Biases (the real `wandb` package; offline mode writes a run directory under
<output-dir>/wandb that `wandb sync` uploads later)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

from glm_rl.config.fields import opt


@dataclass(frozen=True)
class LogConfig:
    use_tensorboard: bool = opt(False, "also write TensorBoard scalars under <output-dir>/tensorboard")
    use_wandb: bool = opt(False, "also log every step's metrics to Weights & Biases")
    wandb_project: str = opt("glm-rl", "W&B project")
    wandb_group: str | None = opt(None, "W&B run group")
    wandb_run_name: str | None = opt(None, "W&B run name (default: W&B picks one)")
    wandb_mode: Literal["online", "offline"] = opt(
        "online",
        "online: stream to the W&B server (needs a login or WANDB_API_KEY); offline: write <output-dir>/wandb only",
    )

    def errors(self) -> list[str]:
        errors = []
        for flag, on, module, extra in (
            ("--use-wandb", self.use_wandb, "wandb", "wandb"),
            ("--use-tensorboard", self.use_tensorboard, "tensorboard", "tensorboard"),
        ):
            if on and importlib.util.find_spec(module) is None:
                errors.append(f"{flag} needs the {module} package (pip install {extra}, or glm-rl's [logging] extra)")
        return errors
