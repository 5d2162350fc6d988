"""The RL loop, top-down: generate → advantages → old logprobs → corrections → train → sync → log → save.
With --one-step-off / --fully-async the rollout runs ahead of the step (overlap.py); the step is the same.

Every stage is one call on an object built in `setup`; the loop itself holds no algorithm details.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from glm_rl.checkpoint import CheckpointError, resume_hint
from glm_rl.config import RunConfig
from glm_rl.metrics import MetricsWriter, console_line, write_report
from glm_rl.overlap import SyncRollouts, mask_older_versions, rollouts_for, staleness_metrics
from glm_rl.recovery import EnginesLost
from glm_rl.replay import ReplayRuntime
from glm_rl.rollout.debug_data import save_rollout
from glm_rl.runtime import Runtime
from glm_rl.trainer import steps
from glm_rl.trainer.group import TrainerRankDied


def train(cfg: RunConfig) -> Path:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.to_json())
    rt = (ReplayRuntime if cfg.debug.load_debug_rollout_data else Runtime).start(cfg)  # replay: trainers only
    rollouts = rollouts_for(cfg, rt)  # synchronous, one-step-off or fully async (overlap.py)
    try:
        start = rt.resume()
        writer = MetricsWriter(out, cfg.log, append=start > 0, run_config=json.loads(cfg.to_json()))
        if start == 0 and cfg.eval.due(0, cfg.num_rollout):  # --eval-before-train
            row = {"step": 0} | rt.evaluate(0)
            writer.write(row)
            tqdm.write(console_line(row))
        for step in tqdm(
            range(start, cfg.num_rollout), desc="RL steps", initial=start, total=cfg.num_rollout, dynamic_ncols=True
        ):
            metrics = run_step(cfg, rt, step, rollouts)
            if cfg.eval.due(step + 1, cfg.num_rollout):  # --eval-interval, and the last step
                metrics |= rt.evaluate(step + 1)
            writer.write(metrics)
            tqdm.write(console_line(metrics))
            if cfg.save_interval and (step + 1) % cfg.save_interval == 0 and step + 1 < cfg.num_rollout:
                rt.save(step + 1, rollouts.data_state())
        rt.save(cfg.num_rollout, rollouts.data_state())
        writer.close()
    except (TrainerRankDied, EnginesLost, CheckpointError) as e:  # the run cannot go on: say how to resume
        raise SystemExit(f"glm-rl train stopped: {e}. {resume_hint(cfg.save_dir)}") from None
    finally:
        rollouts.close()
        rt.shutdown()
    if cfg.report:
        write_report(out / "metrics.jsonl", out / "report.png")
    return out


def run_step(cfg: RunConfig, rt: Runtime | ReplayRuntime, step: int, rollouts: SyncRollouts | None = None) -> dict:
    rollouts = rollouts or SyncRollouts(rt)
    t0 = time.time()
    health = rt.ensure_engines()  # restart dead engines, give them weights
    health["perf/ensure_engines_s"] = time.time() - t0
    memory = rt.colocation.to_rollout()  # --colocate on GPUs: the trainer lets go of the GPU (colocation.py)
    samples, metrics = rollouts.get(step)  # engines, through the router (ahead of the step when async)
    metrics |= memory | rt.colocation.to_train()  # the engines let go, the trainer comes back
    if cfg.asynchrony.mode != "sync":
        metrics |= staleness_metrics(samples, rt.weight_version)
        if cfg.asynchrony.mask_offpolicy_in_partial_rollout:
            metrics["rollout/offpolicy_masked_tokens"] = float(mask_older_versions(samples))
    if cfg.debug.save_debug_rollout_data:  # before the driver adds advantages
        save_rollout(cfg.debug.path(cfg.debug.save_debug_rollout_data, step), step, samples, metrics)
    steps.assign_advantages(samples, cfg.algo, cfg.rollout.n_samples_per_prompt)  # GRPO / GSPO / Dr.GRPO
    t1 = time.time()
    dropout = cfg.lora.lora_dropout if cfg.lora.lora_rank > 0 else 0.0
    in_training = steps.old_logprobs_in_training(samples, cfg.algo, cfg.train, dropout)  # on-policy, one step
    if in_training:  # the training forward's logprobs are the old ones; TIS and mismatch metrics in its loss
        steps.leave_old_logprobs_to_training(samples)
    else:
        metrics |= steps.old_logprobs(samples, cfg.algo, rt.trainers)  # recompute (R2 record / R3 replay)
        metrics |= steps.corrections(samples, cfg.algo)  # TIS / MIS, mismatch metrics
    t2 = time.time()
    metrics |= steps.train(samples, cfg.train, rt.trainers)  # one optimizer step per global batch
    if in_training and "routing/train_replay_agreement" in metrics:  # R3 replay vs natural routing, same weights
        metrics["routing/replay_agreement"] = metrics["routing/train_replay_agreement"]
    t3 = time.time()
    metrics |= rt.colocation.to_sync()  # the engines' weight memory back, for the push to fill
    metrics |= rollouts.sync(version=step + 1)  # trainer → engines, verified (async: pausing / waiting as needed)
    t4 = time.time()
    metrics = (
        health
        | metrics
        | {  # the sync's engines/restarted counts the whole step
            "step": step + 1,
            "perf/logprob_s": t2 - t1,
            "perf/train_s": t3 - t2,
            "perf/sync_s": t4 - t3,
            "perf/step_s": time.time() - t0,
            "perf/prep_s": t1 - t0 - metrics["perf/rollout_s"],
        }
    )
    return metrics


def summarize(output_dir: Path, window: int = 5) -> dict:
    """First / last `window` steps' mean reward of a finished run (for the README and tests)."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "rollout/reward_mean" in r]  # not the eval-only row of --eval-before-train
    rewards = [r["rollout/reward_mean"] for r in rows]
    first, last = rewards[:window], rewards[-window:]
    return {"steps": len(rows), "reward_first": sum(first) / len(first), "reward_last": sum(last) / len(last)}
