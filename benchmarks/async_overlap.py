"""Synchronous vs one-step-off vs fully-async RL on the CPU (issue 19): same model, data, batch and steps.

    python benchmarks/async_overlap.py                       # the tiny demo's settings, 60 steps per mode
    python benchmarks/async_overlap.py --steps 20 --extra "--rollout-max-response-len 32"

Each mode is one `python -m glm_rl.cli train` subprocess. While it runs, this script pins (os.sched_setaffinity,
every thread, re-applied as threads appear) the rollout side — engines, the rollout manager, the router — to CPU 0
and the trainer ranks to CPU 1, so the overlap is what one engine host and one trainer host would get. Per mode:
steps/s over the steady steps (after `--warmup`; from each step's `perf/step_s`), the ratio to synchronous, mean
reward of the first / last 5 steps, the staleness, the trainer's wait for rollouts and the engines' idle time.
Writes a table, `--out` (JSON) and `--plot` (reward vs samples trained, the three modes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from glm_rl.reaper import descendants  # noqa: E402

MODES = {
    "sync": [],
    "one-step-off": ["--one-step-off"],
    "fully-async": ["--fully-async"],
    "fully-async+partial": ["--fully-async", "--partial-rollout"],
}
ROLLOUT_SIDE = ("EmbeddedEngine", "RolloutManager", "sglang")  # pinned to CPU 0
TRAINER_SIDE = ("TrainerActor",)  # pinned to CPU 1


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pin(pid: int, cpus: set[int]) -> None:
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except OSError:  # the thread ended meanwhile
            pass


def _pinner(root: int, stop: threading.Event, pinned: dict[str, int]) -> None:
    while not stop.wait(0.5):
        for pid in descendants(root):
            name = _cmdline(pid)
            for side, cpu in ((ROLLOUT_SIDE, 0), (TRAINER_SIDE, 1)):
                if any(s in name for s in side):
                    _pin(pid, {cpu})
                    pinned[f"{pid}:{name.split()[0]}"] = cpu


def run_mode(mode: str, args, work: Path) -> dict:
    out = work / mode
    cmd = [
        sys.executable, "-m", "glm_rl.cli", "train", "--output-dir", str(out), "--num-rollout", str(args.steps),
        "--no-report", *MODES[mode], *shlex.split(args.extra),
    ]  # fmt: skip
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stop, pinned = threading.Event(), {}
    pinner = threading.Thread(target=_pinner, args=(proc.pid, stop, pinned), daemon=True)
    pinner.start()
    _, err = proc.communicate()
    stop.set()
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{err[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = rows[args.warmup :]
    step_s = sum(r["perf/step_s"] for r in steady)
    rewards = [r["rollout/reward_mean"] for r in rows]
    samples = [r["rollout/num_samples"] for r in rows]
    return {
        "mode": mode,
        "steps": len(rows),
        "steady_steps_per_s": len(steady) / step_s,
        "steady_step_s_median": statistics.median(r["perf/step_s"] for r in steady),
        "wall_s": time.time() - t0,
        "reward_first5": sum(rewards[:5]) / 5,
        "reward_last5": sum(rewards[-5:]) / 5,
        "staleness_mean": statistics.mean(r.get("rollout/staleness_mean", 0.0) for r in steady),
        "trainer_wait_s_mean": statistics.mean(r.get("async/trainer_wait_s", r["perf/rollout_s"]) for r in steady),
        "engine_idle_s_mean": statistics.mean(r.get("async/engine_idle_s", 0.0) for r in steady),
        "pinned_processes": len(pinned),
        "curve": {"samples": [sum(samples[: i + 1]) for i in range(len(rows))], "reward": rewards},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of steps/s")
    p.add_argument("--extra", default="", help="flags added to every mode's glm-rl train")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--work-dir", default="outputs/bench-async")
    p.add_argument("--out", default="benchmarks/results/async_overlap.json")
    p.add_argument("--plot", default="benchmarks/results/async_overlap.png")
    args = p.parse_args()
    if os.cpu_count() < 2:
        raise SystemExit("needs 2 CPUs (one for the rollout side, one for the trainer)")
    work = Path(args.work_dir)
    results = [run_mode(mode, args, work) for mode in args.modes]
    base = next((r for r in results if r["mode"] == "sync"), results[0])
    print(f"{'mode':<14}{'steps/s':>9}{'vs sync':>9}{'reward 5→5':>16}{'stale':>7}{'wait s':>8}{'idle s':>8}")
    for r in results:
        r["vs_sync"] = r["steady_steps_per_s"] / base["steady_steps_per_s"]
        print(
            f"{r['mode']:<14}{r['steady_steps_per_s']:>9.3f}{r['vs_sync']:>8.2f}×"
            f"{r['reward_first5']:>8.3f}→{r['reward_last5']:.3f}{r['staleness_mean']:>7.2f}"
            f"{r['trainer_wait_s_mean']:>8.2f}{r['engine_idle_s_mean']:>8.2f}"
        )
    record = {
        "date": datetime.date.today().isoformat(),
        "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "steps": args.steps,
        "extra": args.extra,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.plot(r["curve"]["samples"], r["curve"]["reward"], label=f"{r['mode']} ({r['vs_sync']:.2f}× steps/s)")
    ax.set_xlabel("samples trained")
    ax.set_ylabel("mean reward of the step's rollout")
    ax.set_title("tiny GLM-4.5 on 2 CPUs: rollout on CPU 0, trainer on CPU 1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
