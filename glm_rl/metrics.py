"""Per-step metrics: one JSON object per line in <output-dir>/metrics.jsonl, a console line, optional
TensorBoard, and the end-of-run PNG report (reward, mismatch and timing curves)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPORT_PANELS = {
    "reward": ["rollout/reward_mean"],
    "train/rollout mismatch": ["mismatch/logprob_abs_diff_mean", "mismatch/logprob_abs_diff_max", "mismatch/k3_kl"],
    "seconds per step": ["perf/rollout_s", "perf/logprob_s", "perf/train_s", "perf/sync_s", "perf/step_s"],
}


class MetricsWriter:
    def __init__(self, output_dir: Path, tensorboard: bool = False, append: bool = False) -> None:
        self.path = output_dir / "metrics.jsonl"
        output_dir.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a" if append else "w")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps(metrics) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, metrics["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def console_line(m: dict[str, Any]) -> str:
    return (f"step {m['step']:4d} | reward {m['rollout/reward_mean']:.3f} | loss {m.get('train/loss', 0):+.4f} "
            f"| kl {m.get('train/ppo_kl', 0):+.2e} | mismatch max {m.get('mismatch/logprob_abs_diff_max', 0):.1e} "
            f"| replay {m.get('routing/replay_agreement', float('nan')):.3f} | sync ok {m.get('sync/verified', 0):.0f} "
            f"| {m['perf/step_s']:.1f}s")


def write_report(metrics_path: Path, out_png: Path) -> None:
    """Three panels over steps; the reward panel adds a 5-step moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, len(REPORT_PANELS), figsize=(15, 4))
    for ax, (title, keys) in zip(axes, REPORT_PANELS.items()):
        for key in keys:
            ys = [r.get(key, float("nan")) for r in rows]
            ax.plot(steps, ys, label=key.split("/", 1)[1], alpha=0.8)
            if key == "rollout/reward_mean" and len(ys) >= 5:
                avg = [sum(ys[max(0, i - 4):i + 1]) / len(ys[max(0, i - 4):i + 1]) for i in range(len(ys))]
                ax.plot(steps, avg, label="5-step mean", linewidth=2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    axes[1].set_yscale("symlog", linthresh=1e-7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
