"""Step-time breakdown of `glm-rl train`: where a step's wall time goes.

    python benchmarks/step_breakdown.py [--out benchmarks/results/step_breakdown.json] [train flags...]

Runs a short training job (defaults: the tiny demo, 8 steps), then prints per-stage mean seconds and the share
of step time spent outside rollout + old-logprob + train + sync (the orchestration overhead; goal <= 10 %).
The first step is left out (start-up effects).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from glm_rl.config import parse_args
from glm_rl.metrics import read_metrics
from glm_rl.train import train

STAGES = ["perf/rollout_s", "perf/logprob_s", "perf/train_s", "perf/sync_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/step_breakdown.json"))
    args, train_flags = ap.parse_known_args()
    flags = ["--num-rollout", "8", "--output-dir", "outputs/bench-step-breakdown", "--no-report", *train_flags]
    cfg = parse_args(flags)
    t0 = time.time()
    out = train(cfg)
    rows = read_metrics(out / "metrics.jsonl")[1:]
    step = sum(r["perf/step_s"] for r in rows) / len(rows)
    table = {k: sum(r[k] for r in rows) / len(rows) for k in STAGES}
    other = step - sum(table.values())
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "flags": flags,
        "steps_measured": len(rows),
        "step_s": step,
        "stages_s": table,
        "other_s": other,
        "other_share": other / step,
        "wall_s": time.time() - t0,
    }
    print(f"{'stage':<12}{'seconds':>10}{'share':>9}")
    for k, v in table.items():
        print(f"{k.split('/')[1][:-2]:<12}{v:>10.3f}{v / step:>9.1%}")
    print(f"{'other':<12}{other:>10.3f}{other / step:>9.1%}")
    print(f"{'step':<12}{step:>10.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
