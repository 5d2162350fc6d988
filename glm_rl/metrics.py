"""Per-step metrics: one JSON object per line in <output-dir>/metrics.jsonl, a console line, optional
TensorBoard scalars and Weights & Biases, and the end-of-run PNG report (reward, eval, mismatch and timing).

Every sink gets the same rows, keyed by "step" (steps trained so far; an eval before training is a row of its own
at step 0, later evals join the row of the step they follow). W&B runs in the driver process with the run's
config attached; `--wandb-mode offline` writes <output-dir>/wandb/offline-run-*/ for `wandb sync`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glm_rl.config import LogConfig

REPORT_PANELS = {
    "reward": ["rollout/reward_mean"],
    "eval (per set)": [],  # filled with every eval/<name>/pass@k found in the rows
    "train/rollout mismatch": ["mismatch/logprob_abs_diff_mean", "mismatch/logprob_abs_diff_max", "mismatch/k3_kl"],
    "seconds per step": ["perf/rollout_s", "perf/logprob_s", "perf/train_s", "perf/sync_s", "perf/step_s"],
}


class MetricsWriter:
    def __init__(
        self,
        output_dir: Path,
        log: LogConfig | None = None,
        append: bool = False,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        log = log or LogConfig()
        self.path = output_dir / "metrics.jsonl"
        output_dir.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a" if append else "w")
        self._tb = self._wandb = None
        if log.use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(output_dir / "tensorboard"))
        if log.use_wandb:
            import wandb

            self._wandb = wandb.init(
                project=log.wandb_project,
                group=log.wandb_group,
                name=log.wandb_run_name,
                mode=log.wandb_mode,
                dir=str(output_dir),
                config=run_config or {},
            )

    def write(self, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps(metrics) + "\n")
        self._file.flush()
        scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float) and k != "step"}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, metrics["step"])
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(metrics["step"]))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_summary(m: dict[str, Any]) -> str:
    """'eval arith pass@1 0.450 | …' for every eval set in the row ('' when none)."""
    sets = sorted({k.split("/")[1] for k in m if k.startswith("eval/") and k.endswith("/pass@1")})
    return " | ".join(f"eval {name} pass@1 {m[f'eval/{name}/pass@1']:.3f}" for name in sets)


def console_line(m: dict[str, Any]) -> str:
    evals = eval_summary(m)
    if "rollout/reward_mean" not in m:  # an eval-only row (before training)
        return f"step {m['step']:4d} | {evals}"
    line = (
        f"step {m['step']:4d} | reward {m['rollout/reward_mean']:.3f} | loss {m.get('train/loss', 0):+.4f} "
        f"| kl {m.get('train/ppo_kl', 0):+.2e} | mismatch max {m.get('mismatch/logprob_abs_diff_max', 0):.1e} "
        f"| replay {m.get('routing/replay_agreement', float('nan')):.3f} | sync ok {m.get('sync/verified', 0):.0f} "
        f"| {m['perf/step_s']:.1f}s"
    )
    if m.get("rollout/filtered_groups") or m.get("rollout/sampling_rounds", 1) > 1:  # dynamic sampling at work
        line += f" | filtered {m['rollout/filtered_groups']:.0f} rounds {m['rollout/sampling_rounds']:.0f}"
    return f"{line} | {evals}" if evals else line


def _panel_keys(title: str, keys: list[str], rows: list[dict[str, Any]]) -> list[str]:
    if title.startswith("eval"):
        return sorted({k for r in rows for k in r if k.startswith("eval/") and "/pass@" in k})
    return keys


def write_report(metrics_path: Path, out_png: Path) -> None:
    """One panel per REPORT_PANELS entry over steps; the reward panel adds a 5-step moving average, the eval
    panel plots each set's points at the steps it was evaluated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, len(REPORT_PANELS), figsize=(5 * len(REPORT_PANELS), 4))
    for ax, (title, keys) in zip(axes, REPORT_PANELS.items()):
        for key in _panel_keys(title, keys, rows):
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
            steps, ys = [p[0] for p in points], [p[1] for p in points]
            ax.plot(steps, ys, label=key.split("/", 1)[1], alpha=0.8, marker="o" if title.startswith("eval") else None)
            if key == "rollout/reward_mean" and len(ys) >= 5:
                avg = [sum(ys[max(0, i - 4) : i + 1]) / len(ys[max(0, i - 4) : i + 1]) for i in range(len(ys))]
                ax.plot(steps, avg, label="5-step mean", linewidth=2)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    axes[list(REPORT_PANELS).index("train/rollout mismatch")].set_yscale("symlog", linthresh=1e-7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
