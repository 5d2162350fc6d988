"""Tool-use demo (glm_rl/rollout/agentic/demo.py): build its checkpoint and data, and report a finished run.

    python tools/make_tool_demo.py build outputs/tool-demo          # checkpoint/ (warm-started) and train.jsonl
    python tools/make_tool_demo.py report outputs/tool-demo/run     # after glm-rl train ... --save-debug-rollout-data

`report` reads `metrics.jsonl` and the per-step rollout dumps (`<run>/dumps/rollout_{rollout_id}.pt`) and prints,
for the first and the last 5 steps, the mean reward and the share of episodes whose first turn is a well-formed
`calculator` call (no malformed call) whose expression evaluates to the label — what RL should raise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transformers import AutoTokenizer

from glm_rl.rollout.agentic.demo import make_checkpoint, make_data
from glm_rl.rollout.agentic.glm45_format import parse_turn
from glm_rl.rollout.agentic.tools import calculate
from glm_rl.rollout.debug_data import load_rollout
from glm_rl.rollout.samples import Sample


def first_turn(sample: Sample) -> list[int]:
    """The ids the model generated in the episode's first turn (loss mask 1 up to the first observation)."""
    ids = []
    for tok, m in zip(sample.response_ids, sample.loss_mask or [1] * len(sample.response_ids)):
        if not m:
            break
        ids.append(tok)
    return ids


def correct_call(sample: Sample, tokenizer) -> bool:
    """The first turn calls `calculator` once, well-formed, with an expression whose value is the label."""
    episode = (sample.metadata or {}).get("episode", {})
    if episode.get("malformed_calls", 0) or not episode.get("tool_calls", 0):
        return False
    calls = parse_turn(tokenizer.decode(first_turn(sample), skip_special_tokens=False)).calls
    if len(calls) != 1 or calls[0].name != "calculator":
        return False
    try:
        return calculate(calls[0].arguments.get("expression", "")) == str(sample.label)
    except Exception:  # an expression the calculator refuses is an incorrect call
        return False


def report(run: Path, checkpoint: Path, window: int = 5) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "rollout/reward_mean" in r]
    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    steps = []
    for step in range(len(rows)):
        samples, _ = load_rollout(run / "dumps" / f"rollout_{step}.pt", step)
        calls = [bool((s.metadata or {}).get("episode", {}).get("tool_calls")) for s in samples]
        good = [correct_call(s, tok) for s in samples]
        steps.append(
            {
                "reward": rows[step]["rollout/reward_mean"],
                "call": sum(calls) / len(samples),
                "correct_call": sum(good) / len(samples),
                "step_s": rows[step].get("perf/step_s", 0.0),
            }
        )

    def mean(key: str, part: list[dict]) -> float:
        return round(sum(s[key] for s in part) / len(part), 3)

    first, last = steps[:window], steps[-window:]
    out = {"steps": len(steps), "steps_s": round(sum(s["step_s"] for s in steps), 1)}
    for key in ("reward", "call", "correct_call"):
        out[f"{key}_first{window}"], out[f"{key}_last{window}"] = mean(key, first), mean(key, last)
    out["per_step"] = [[round(s["reward"], 3), round(s["correct_call"], 3)] for s in steps]
    return out


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    build = sub.add_parser("build", help="checkpoint/ and train.jsonl under ROOT")
    build.add_argument("root", type=Path)
    rep = sub.add_parser("report", help="first / last 5 steps of a run: reward and correct-call share")
    rep.add_argument("run", type=Path)
    rep.add_argument("--checkpoint", type=Path, default=None, help="default: RUN/../checkpoint")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        print(make_checkpoint(args.root / "checkpoint"), make_data(args.root / "train.jsonl"))
    else:
        print(json.dumps(report(args.run, args.checkpoint or args.run.parent / "checkpoint"), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
