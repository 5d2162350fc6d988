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
