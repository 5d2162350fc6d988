"""The `glm-rl` command line (Typer). Each command parses its flags and hands off to one module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from glm_rl.models.presets import PRESETS, TINY_CHECKPOINT

app = typer.Typer(add_completion=False, no_args_is_help=True, help="RL post-training for GLM-4.5 MoE models.")
console = Console(width=max(Console().width, 110))  # tables stay readable when piped

TINY_DATA = TINY_CHECKPOINT.parent / "arith"


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="print a JSON list instead of a table")) -> None:
    """List the GLM-4.5 presets with parameter counts (active excludes embeddings and LM head)."""
    rows = [spec().summary() for spec in PRESETS.values()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="GLM-4.5 family presets")
    table.add_column("name", no_wrap=True, min_width=20)
    for col in ("total", "active", "MTP", "layers (dense)", "hidden", "experts / top-k", "QK-norm"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], _human(r["total_params"]), _human(r["active_params"]), _human(r["mtp_params"]),
                      f"{r['layers']} ({r['dense_layers']})", str(r["hidden"]), f"{r['experts']} / {r['top_k']}",
                      "yes" if r["qk_norm"] else "no")
    console.print(table)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def train(ctx: typer.Context) -> None:
    """Run RL post-training (no flags: the tiny CPU demo). `glm-rl train --help` lists every flag."""
    from glm_rl.config import parse_args

    cfg = parse_args(list(ctx.args))  # validated before anything starts
    from glm_rl.train import summarize, train as run_train

    out = run_train(cfg)
    s = summarize(out)
    console.print(f"done: {s['steps']} steps, mean reward first 5 {s['reward_first']:.3f} -> last 5 "
                  f"{s['reward_last']:.3f}; metrics {out / 'metrics.jsonl'}, report {out / 'report.png'}")


@app.command("eval")
def eval_cmd(
    hf_checkpoint: Path = typer.Option(TINY_CHECKPOINT, help="HF checkpoint directory"),
    prompt_data: Path = typer.Option(TINY_DATA / "eval.jsonl", help="JSONL with `prompt` and `label`"),
    rm_type: str = typer.Option("arithmetic", help="rule-based reward"),
    temperature: float = typer.Option(1.0, help="sampling temperature (0 = greedy)"),
    max_new_tokens: int = typer.Option(16),
    seed: int = typer.Option(0),
    preset: Optional[str] = typer.Option(None, help="check the checkpoint against this preset first"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Accuracy of a checkpoint on a prompt set (HF reference sampler)."""
    from glm_rl.evaluate import evaluate
    from glm_rl.models.checkpoint import load_hf_model
    from glm_rl.rollout.data import load_prompts
    from glm_rl.rollout.rewards import get_reward_fn

    reward_fn = get_reward_fn(rm_type)
    rows = load_prompts(prompt_data)
    model, tokenizer = load_hf_model(hf_checkpoint, preset=preset)
    result = evaluate(model, tokenizer, rows, reward_fn, temperature=temperature,
                      max_new_tokens=max_new_tokens, seed=seed)
    summary = {"accuracy": result.accuracy, "n": result.n, "temperature": temperature}
    typer.echo(json.dumps(summary) if as_json else
               f"accuracy {result.accuracy:.3f} on {result.n} prompts at temperature {temperature}")


@app.command()
def generate(
    prompt_file: Path = typer.Option(..., help="JSONL with `prompt` per line, or plain text lines"),
    hf_checkpoint: Path = typer.Option(TINY_CHECKPOINT, help="HF checkpoint directory"),
    enable_mtp: bool = typer.Option(False, "--enable-mtp", help="MTP speculative decoding"),
    speculative_num_steps: int = typer.Option(1, help="MTP drafts per verify forward (with --enable-mtp)"),
    temperature: float = typer.Option(1.0, help="sampling temperature (0 = greedy)"),
    top_p: float = typer.Option(1.0),
    top_k: int = typer.Option(-1),
    max_new_tokens: int = typer.Option(32, help="clipped to the model's context"),
    chat_template: bool = typer.Option(True, help="wrap each prompt as a user turn (as the rollout does)"),
    dtype: str = typer.Option("float32"),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Generate with the embedded engine in-process (no Ray): tokens, text, logprobs, speculation stats."""
    import time

    from glm_rl.evaluate import chat_prompt_ids
    from glm_rl.rollout.engines.embedded import EmbeddedEngine, EngineConfig
    from glm_rl.rollout.engines.generation import GenerationRequest, SamplingParams, request_seed

    lines = [line for line in prompt_file.read_text().splitlines() if line.strip()]
    texts = [_prompt_text(line) for line in lines]
    engine = EmbeddedEngine(EngineConfig(hf_checkpoint=str(hf_checkpoint), dtype=dtype, seed=seed,
                                         enable_mtp=enable_mtp, speculative_num_steps=speculative_num_steps))
    engine.start()
    try:
        requests = []
        for i, text in enumerate(texts):
            ids = chat_prompt_ids(engine.tokenizer, text) if chat_template else \
                engine.tokenizer.encode(text, add_special_tokens=False)
            room = engine.max_total_len - len(ids)
            if room < 1:
                raise ValueError(f"{prompt_file}:{i + 1}: prompt of {len(ids)} tokens fills the context")
            sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                                      max_new_tokens=min(max_new_tokens, room))
            requests.append(GenerationRequest(rid=f"p{i}", input_ids=tuple(ids), sampling=sampling,
                                              seed=request_seed(seed, ("generate", i)), return_logprob=True))
        t0 = time.perf_counter()
        answers = [f.result() for f in engine.submit(requests)]
        seconds = time.perf_counter() - t0
    finally:
        engine.shutdown()
    _print_generations(texts, answers, seconds, enable_mtp, temperature, as_json)


def _print_generations(texts: list[str], answers: list[dict], seconds: float, enable_mtp: bool,
                       temperature: float, as_json: bool) -> None:
    results = [{"prompt": text, "output_ids": a["output_ids"], "text": a["text"],
                "logprobs": [lp for lp, _, _ in a["meta_info"]["output_token_logprobs"]],
                "finish_reason": a["meta_info"]["finish_reason"]["type"],
                **{k: v for k, v in a["meta_info"].items() if k.startswith("spec_")}}
               for text, a in zip(texts, answers)]
    tokens = sum(len(r["output_ids"]) for r in results)
    verify = sum(r.get("spec_verify_ct", 0) for r in results)
    summary = {"prompts": len(results), "completion_tokens": tokens, "seconds": round(seconds, 4),
               "tokens_per_s": round(tokens / seconds, 2) if seconds else None, "enable_mtp": enable_mtp,
               "temperature": temperature, "spec_verify_ct": verify if enable_mtp else None,
               "spec_accept_length": round(tokens / verify, 4) if verify else None}
    if as_json:
        typer.echo(json.dumps({"results": results, "summary": summary}))
        return
    for i, r in enumerate(results):
        spec = f", accept length {r['spec_accept_length']:.2f}" if "spec_accept_length" in r else ""
        typer.echo(f"[{i}] {r['prompt']!r} -> {r['text']!r}  ({len(r['output_ids'])} tokens, "
                   f"{r['finish_reason']}{spec})\n    tokens {r['output_ids']}\n"
                   f"    logprobs {[round(x, 4) for x in r['logprobs']]}")
    typer.echo(json.dumps(summary))


def _prompt_text(line: str) -> str:
    """A prompt-file line: a JSON object's `prompt`, or the line itself."""
    try:
        row = json.loads(line)
    except ValueError:
        return line
    if isinstance(row, dict):
        if not isinstance(row.get("prompt"), str):
            raise ValueError(f"prompt file: JSON line without a string `prompt`: {line[:80]!r}")
        return row["prompt"]
    return line


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def main() -> None:
    try:
        app()
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        console.print(f"[red]error:[/red] {e}")
        raise SystemExit(2)


if __name__ == "__main__":
    main()
