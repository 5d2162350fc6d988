"""The whole GRPO step, glm_rl vs TRL's `GRPOTrainer`: same model, data, reward and box (issues 20 and 25).

    python benchmarks/rl_step_vs_trl.py                   # GPU: the 1.06 B model, 64 prompts x 8, 128 tokens, 6 steps
    python benchmarks/rl_step_vs_trl.py --arms glm_rl --glm-rl-args "--no-check-weight-update-equal"
    python benchmarks/rl_step_vs_trl.py --device cpu --prompts 4 --samples 4 --response-len 8 --steps 3 \
        --trl-micro-batch 8 \
        --model-spec hidden=64,layers=2,experts=4,top_k=2,ffn=32,vocab=64,heads=2,kv_heads=1,dense_ffn=128

The model (benchmarks/_models.py, random init; `--model-spec` overrides fields) is saved once per spec under
`--work-dir` as an HF checkpoint with the tiny checkpoint's tokenizer and chat template, and both arms load it.
A step: `--prompts` prompts of the arithmetic task (glm_rl/assets/arith/train.jsonl, chat template, reward
`arithmetic`) x `--samples` responses of <= `--response-len` tokens at temperature 1, then one optimizer step
(same lr, AdamW betas 0.9 / 0.98, weight decay 0, grad clip 1, no KL or reference model).
- glm_rl: a `python -m glm_rl.cli train` subprocess, colocated on one GPU (GLM_RL_FLAGS), its defaults otherwise
  (sync verification and R3 on; `--glm-rl-args` appends flags); stages from its metrics.jsonl.
- TRL: `GRPOTrainer` (transformers `generate`) in a subprocess of this script that imports neither Ray nor
  glm_rl's engine / trainer (only its grader); one generation of prompts x samples per optimizer step, in
  micro-batches of `--trl-micro-batch`; gradient checkpointing off unless `--trl-gradient-checkpointing` (on is
  GRPOConfig's default). Step time from a TrainerCallback (CUDA-synchronised); `generate` and the rest of the
  input preparation (rewards, advantages) from TRL's own profiling spans; train is the remainder.
Per arm: steady step (median after `--warmup` steps), tokens/s of the whole step (prompt + response tokens trained
per second; prompt tokens: TRL's count, and for glm_rl samples x the task's mean prompt length), stage medians,
first step, mean reward first / last; glm_rl over TRL is the tokens/s ratio. Prints a table, writes `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "glm_rl" / "assets" / "glm45-tiny"
ARITH = REPO / "glm_rl" / "assets" / "arith" / "train.jsonl"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
# the one-GPU colocated layout; glm_rl's defaults otherwise (sync verification and R3 on)
GLM_RL_FLAGS = (
    "--colocate --num-engines 1 --num-trainer-ranks 1 --update-weight-transfer-mode tensor --rm-type arithmetic "
    "--rollout-temperature 1.0 --no-report"
).split()
TRL_REPORTED = (
    "per_device_train_batch_size gradient_accumulation_steps generation_batch_size steps_per_generation "
    "gradient_checkpointing loss_type scale_rewards epsilon bf16"
).split()
GLM_RL_CHECKS = ("sync/verified", "routing/replay_agreement", "train/optimizer_steps", "mismatch/logprob_abs_diff_max")
PACKAGES = ("torch", "transformers", "trl", "accelerate", "datasets", "glm-rl", "ray", "megatron-core")
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]  # glm_rl (also when not installed) and _models


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default="glm_rl,trl", help="comma list of glm_rl, trl")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float32"), help="default: bf16 on CUDA, else fp32")
    ap.add_argument("--model-spec", default="default", help="'default' or hidden=...,layers=...,experts=...,...")
    ap.add_argument("--prompts", type=int, default=64, help="prompts per step")
    ap.add_argument("--samples", type=int, default=8, help="responses per prompt (the GRPO group)")
    ap.add_argument("--response-len", type=int, default=128, help="max new tokens per response")
    ap.add_argument("--steps", type=int, default=6, help="RL steps per arm")
    ap.add_argument("--warmup", type=int, default=1, help="first steps reported apart, not in the steady figures")
    ap.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate of both arms")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--max-tokens-per-gpu", type=int, default=16384, help="glm_rl micro-batch token budget")
    ap.add_argument(
        "--glm-rl-args", default="", help="extra `glm-rl train` flags, e.g. '--no-use-rollout-routing-replay'"
    )
    ap.add_argument("--trl-micro-batch", type=int, default=64, help="TRL per_device_train_batch_size")
    ap.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL: GRPOConfig's default (on)")
    ap.add_argument("--work-dir", type=Path, default=Path("outputs/rl_step_vs_trl"), help="checkpoint, runs, logs")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/rl_step_vs_trl.json"))
    ap.add_argument("--trl-worker", type=Path, default=None, help=argparse.SUPPRESS)  # internal: TRL subprocess
    ap.add_argument("--ckpt", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.arms = [a for a in args.arms.split(",") if a]
    if set(args.arms) - {"glm_rl", "trl"} or not 0 <= args.warmup < args.steps:
        raise SystemExit(f"--arms {args.arms} must be glm_rl / trl; need 0 <= --warmup {args.warmup} < --steps")
    return args


def build_checkpoint(args) -> tuple[Path, dict]:
    """The random-init model as an HF checkpoint with the tiny model's tokenizer (built once per spec)."""
    from _models import random_spec
    from transformers import AutoTokenizer

    spec = random_spec(args.model_spec, "--model-spec")
    tokenizer = AutoTokenizer.from_pretrained(str(TINY))
    if len(tokenizer) > spec.vocab_size:  # prompt / eos / pad ids must be rows of the model's embedding
        raise SystemExit(f"--model-spec vocab {spec.vocab_size} < the tokenizer's {len(tokenizer)} ids")
    key = json.dumps([dataclasses.asdict(spec), args.dtype, args.seed], sort_keys=True)
    path = args.work_dir / f"ckpt-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if not (path / "bench_spec.json").is_file():
        import torch
        from transformers import Glm4MoeForCausalLM

        tiny = json.loads((TINY / "config.json").read_text())
        torch.manual_seed(args.seed)
        config = spec.to_hf_config(
            eos_token_id=tiny["eos_token_id"], pad_token_id=tiny["pad_token_id"], bos_token_id=None
        )
        t0 = time.time()
        model = Glm4MoeForCausalLM(config).to(getattr(torch, args.dtype))
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            shutil.copy(TINY / name, tmp / name)
        (tmp / "bench_spec.json").write_text(key)
        tmp.rename(path)
        print(f"built {path} in {time.time() - t0:.1f}s", flush=True)
    return path, spec.summary()


def prompt_len_mean(ckpt: Path) -> float:
    """Mean chat-templated prompt length of the task, as glm_rl tokenizes it."""
    from transformers import AutoTokenizer

    from glm_rl.rollout.data import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    rows = [json.loads(line) for line in ARITH.read_text().splitlines() if line.strip()]
    return statistics.fmean(len(prompt_ids(tokenizer, r["prompt"])) for r in rows)


def run_logged(cmd: list[str], log: Path, cpu: bool) -> tuple[int, float]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)  # glm_rl, installed or not
    env = os.environ | {"PYTHONPATH": path} | ({"CUDA_VISIBLE_DEVICES": ""} if cpu else {})
    print(f"$ {shlex.join(cmd)}\n  (log: {log})", flush=True)
    t0 = time.time()
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    return rc, time.time() - t0


def fail(arm: str, rc: int, log: Path) -> None:
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    raise SystemExit(f"{tail}\n{arm} arm failed (exit {rc}); full log: {log}")


def run_glm_rl(args, ckpt: Path, prompt_len: float) -> dict:
    out = (args.work_dir / "glm_rl").resolve()
    shutil.rmtree(out, ignore_errors=True)
    n = args.prompts * args.samples
    opts = {
        "--hf-checkpoint": ckpt.resolve(),
        "--prompt-data": ARITH,
        "--dtype": args.dtype,
        "--global-batch-size": n,  # one optimizer step per RL step
        "--max-tokens-per-gpu": args.max_tokens_per_gpu,
        "--rollout-batch-size": args.prompts,
        "--n-samples-per-prompt": args.samples,
        "--rollout-max-response-len": args.response_len,
        "--lr": args.lr,
        "--num-rollout": args.steps,
        "--seed": args.seed,
        "--output-dir": out,
    }
    flags = [*GLM_RL_FLAGS, *(x for k, v in opts.items() for x in (k, str(v))), *shlex.split(args.glm_rl_args)]
    cmd = [sys.executable, "-m", "glm_rl.cli", "train", *flags]
    log = args.work_dir / "glm_rl.log"
    rc, wall = run_logged(cmd, log, args.device == "cpu")
    metrics = out / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    rows = [r for r in rows if "perf/step_s" in r]
    if len(rows) < args.steps:
        fail("glm_rl", rc, log)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the final save: weights + optimizer state
    steps = []
    for r in rows:
        stages = {k: r[f"perf/{k}_s"] for k in ("rollout", "logprob", "train", "sync")}
        stages["other"] = r["perf/step_s"] - sum(stages.values())
        samples = r.get("rollout/num_samples", n)
        length = r["rollout/response_len_mean"]
        step = {"step_s": r["perf/step_s"], "stages": stages, "reward": r["rollout/reward_mean"]}
        step["sync_verify_s"] = r.get("perf/sync_verify_s")  # inside "sync": the issue's <= 2 % of the step
        step["rollout_outside_engines_s"] = r.get("perf/rollout_outside_engines_s")  # inside "rollout"
        step["engine_decode_tok_s"] = r.get("rollout/engine_decode_tok_s")  # the engine's rate in the loop
        checks = {k: r.get(k) for k in GLM_RL_CHECKS}  # syncs verified, R3 on, one optimizer step
        steps.append(step | {"response_len": length, "tokens": samples * (prompt_len + length), "checks": checks})
    # a nonzero exit after every step was logged (e.g. the final save) is recorded, not fatal
    info = {"arm": "glm_rl", "command": shlex.join(cmd), "exit_code": rc, "wall_s": wall, "steps": steps}
    return info | {"prompt_len_mean": prompt_len, "startup_and_save_s": wall - sum(s["step_s"] for s in steps)}


def run_trl(args, ckpt: Path) -> dict:
    result, log = args.work_dir / "trl_result.json", args.work_dir / "trl.log"
    result.unlink(missing_ok=True)
    worker = ["--trl-worker", str(result.resolve()), "--ckpt", str(ckpt.resolve())]
    cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], *worker]
    rc, wall = run_logged(cmd, log, args.device == "cpu")
    if rc != 0 or not result.is_file():
        fail("trl", rc, log)
    return json.loads(result.read_text()) | {"wall_s": wall}


def step_timer(timings: list, cuda: bool):
    """A TrainerCallback timing each optimizer step and splitting it by TRL's profiling spans."""
    import torch
    from transformers import TrainerCallback

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps, self.logs, self.mark, self.t0 = [], {}, 0, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.mark, self.t0 = len(timings), now()

        def on_step_end(self, args, state, control, **kwargs):
            dt, spans = now() - self.t0, timings[self.mark :]
            gen = sum(d for name, d in spans if name.endswith(".transformers.generate"))
            prep = sum(d for name, d in spans if name.endswith("._prepare_inputs"))
            self.steps.append({"step_s": dt, "stages": {"generate": gen, "prepare": prep - gen, "train": dt - prep}})
            print(f"trl step {state.global_step}: {dt:.2f}s (generate {gen:.2f}s)", flush=True)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs[state.global_step] = self.logs.get(state.global_step, {}) | dict(logs or {})

    return StepTimer()


def trl_trainer(args, callback):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from glm_rl.rollout.rewards.rule import get_reward_fn  # the grader only: no Ray, engine or trainer

    grade = get_reward_fn("arithmetic")

    def arithmetic(completions, label, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [grade(t, y) for t, y in zip(texts, label)]

    rows = [json.loads(line) for line in ARITH.read_text().splitlines() if line.strip()]
    chats = [{"prompt": [{"role": "user", "content": r["prompt"]}], "label": r["label"]} for r in rows]
    total, mb = args.prompts * args.samples, args.trl_micro_batch
    if total % mb:
        raise SystemExit(f"--trl-micro-batch {args.trl_micro_batch} must divide prompts x samples = {total}")
    # one generation of prompts x samples feeds one optimizer step (steps_per_generation = accumulation steps)
    batch = dict(per_device_train_batch_size=mb, gradient_accumulation_steps=total // mb, num_generations=args.samples)
    sampling = dict(max_completion_length=args.response_len, temperature=1.0, top_p=1.0, top_k=0)
    optim = dict(learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.98)
    loss = dict(beta=0.0, max_grad_norm=1.0)  # no KL term, so no reference model (glm_rl: kl 0, --clip-grad 1)
    run = dict(output_dir=str(args.work_dir / "trl"), max_steps=args.steps, seed=args.seed, save_strategy="no")
    device = dict(bf16=args.dtype == "bfloat16", use_cpu=args.device == "cpu", use_vllm=False)
    quiet = dict(logging_steps=1, report_to=[], disable_tqdm=True)
    ckpt = dict(gradient_checkpointing=args.trl_gradient_checkpointing)  # GRPOConfig's default: on
    config = GRPOConfig(**batch, **sampling, **optim, **loss, **run, **device, **quiet, **ckpt)
    model = AutoModelForCausalLM.from_pretrained(str(args.ckpt), dtype=getattr(torch, args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(str(args.ckpt))
    data = Dataset.from_list(chats)
    trainer = GRPOTrainer(model, arithmetic, args=config, train_dataset=data, processing_class=tokenizer)
    trainer.add_callback(callback)
    return trainer


def trl_worker(args) -> None:
    """The TRL arm (in its own process): train `--steps` steps, write per-step figures to `--trl-worker`."""
    import torch
    from trl.extras import profiling

    timings: list[tuple[str, float]] = []
    log_metrics = profiling.ProfilingContext._log_metrics

    def record(self, duration: float) -> None:  # TRL's spans go only to wandb / mlflow / trackio otherwise
        timings.append((self.name, duration))
        log_metrics(self, duration)

    profiling.ProfilingContext._log_metrics = record
    cuda = args.device.startswith("cuda")
    timer = step_timer(timings, cuda)
    trainer = trl_trainer(args, timer)
    trainer.train()
    seen = 0
    for i, step in enumerate(timer.steps, start=1):
        logs = timer.logs.get(i, {})
        step["tokens"], seen = logs.get("num_tokens", seen) - seen, logs.get("num_tokens", seen)
        step["reward"], step["response_len"] = logs.get("reward"), logs.get("completions/mean_length")
    n, mcfg = args.prompts * args.samples, trainer.model.config
    info = {"arm": "trl", "steps": timer.steps, "ray_imported": "ray" in sys.modules}
    info["prompt_len_mean"] = statistics.fmean(s["tokens"] / n - s["response_len"] for s in timer.steps)
    info["config"] = {k: getattr(trainer.args, k) for k in TRL_REPORTED}
    info["model_impl"] = {"attn": mcfg._attn_implementation, "experts": getattr(mcfg, "_experts_implementation", None)}
    info["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    args.trl_worker.write_text(json.dumps(info, indent=2))


def summarize(arm: dict, warmup: int) -> dict:
    steps, steady = arm["steps"], arm["steps"][warmup:]
    out = {"step_s": statistics.median(s["step_s"] for s in steady)}
    out["tokens_per_step"] = statistics.fmean(s["tokens"] for s in steady)
    out["tokens_per_s"] = sum(s["tokens"] for s in steady) / sum(s["step_s"] for s in steady)
    out["stages_s"] = {k: statistics.median(s["stages"][k] for s in steady) for k in steady[0]["stages"]}
    out["first_step_s"], out["warmup_steps_s"] = steps[0]["step_s"], [s["step_s"] for s in steps[:warmup]]
    out["reward_first"], out["reward_last"] = steps[0]["reward"], steps[-1]["reward"]
    if steady[0].get("sync_verify_s") is not None:  # glm_rl: verification's share of the step (issue 25: <= 2 %)
        out["sync_verify_share"] = statistics.median(s["sync_verify_s"] / s["step_s"] for s in steady)
    for key in ("rollout_outside_engines_s", "engine_decode_tok_s"):
        if steady[0].get(key) is not None:
            out[key] = statistics.median(s[key] for s in steady)
    return out | {"response_len_mean": statistics.fmean(s["response_len"] for s in steps)}


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def gpu_memory_used() -> str | None:
    """What nvidia-smi says is in use (another arm's leftovers would show here before an arm starts)."""
    if not shutil.which("nvidia-smi"):
        return None
    query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader"]
    return subprocess.run(query, capture_output=True, text=True).stdout.strip()


def environment(args) -> dict:
    versions = {name: version(name) for name in PACKAGES}
    device = f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    if args.device.startswith("cuda") and shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        device = subprocess.run(query, capture_output=True, text=True).stdout.strip().splitlines()[0]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    out = {"date": time.strftime("%Y-%m-%d"), "device": device, "python": platform.python_version()}
    return out | {"versions": versions, "git_commit": commit.stdout.strip() or None}


def print_table(result: dict) -> None:
    env, w = result["environment"], result["work"]
    print(f"\n{env['date']}  {env['device']}  " + " ".join(f"{k} {v}" for k, v in env["versions"].items() if v))
    print(
        f"model {result['model']['total_params'] / 1e6:,.1f} M params, {w['dtype']}; {w['prompts']} prompts x "
        f"{w['samples']} samples, <= {w['response_len']} new tokens; {w['steps']} steps, {w['warmup']} warm-up"
    )
    print(
        f"{'arm':<8}{'step s':>9}{'tok/step':>10}{'tok/s':>10}{'vs TRL':>8}{'1st step s':>11}{'reward':>15}  stages s"
    )
    ratios = {"glm_rl": result.get("glm_rl_over_trl"), "trl": 1.0 if "glm_rl_over_trl" in result else None}
    for name, s in result["summary"].items():
        ratio = ratios[name]
        stages = " · ".join(f"{k} {v:.3g}" for k, v in s["stages_s"].items())
        if "sync_verify_share" in s:
            stages += f" (verification {100 * s['sync_verify_share']:.1f} % of the step)"
        if "engine_decode_tok_s" in s:
            stages += (
                f"; engine in the loop {s['engine_decode_tok_s']:,.0f} tok/s, rollout outside engines "
                f"{s['rollout_outside_engines_s']:.3g} s"
            )
        reward = f"{s['reward_first']:.3f}→{s['reward_last']:.3f}"
        print(
            f"{name:<8}{s['step_s']:>9.3f}{s['tokens_per_step']:>10.0f}{s['tokens_per_s']:>10.0f}"
            f"{'' if ratio is None else f'{ratio:.2f}x':>8}{s['first_step_s']:>11.2f}{reward:>15}  {stages}"
        )


def main() -> None:
    args = parse_args()
    if args.trl_worker:
        return trl_worker(args)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    ckpt, model = build_checkpoint(args)
    arms = {}
    for arm in args.arms:
        before = gpu_memory_used()
        arms[arm] = run_glm_rl(args, ckpt, prompt_len_mean(ckpt)) if arm == "glm_rl" else run_trl(args, ckpt)
        arms[arm] |= {"gpu_memory_used_before": before}
    work = {k: getattr(args, k) for k in ("dtype", "prompts", "samples", "response_len", "steps", "warmup", "lr")}
    summary = {k: summarize(a, args.warmup) for k, a in arms.items()}
    result = {"environment": environment(args), "model": model, "work": work | {"glm_rl_args": args.glm_rl_args}}
    result |= {"summary": summary, "arms": arms}
    if len(arms) == 2:
        result["glm_rl_over_trl"] = summary["glm_rl"]["tokens_per_s"] / summary["trl"]["tokens_per_s"]
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
