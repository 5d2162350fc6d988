"""The `glm-rl` command line (Typer). Each command parses its flags and hands off to one module."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from glm_rl.models.glm45.presets import PRESETS, TINY_CHECKPOINT

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
        table.add_row(
            r["name"],
            _human(r["total_params"]),
            _human(r["active_params"]),
            _human(r["mtp_params"]),
            f"{r['layers']} ({r['dense_layers']})",
            str(r["hidden"]),
            f"{r['experts']} / {r['top_k']}",
            "yes" if r["qk_norm"] else "no",
        )
    console.print(table)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def train(ctx: typer.Context) -> None:
    """Run RL post-training (no flags: the tiny CPU demo). `glm-rl train --help` lists every flag."""
    from glm_rl.config import parse_args

    cfg = parse_args(list(ctx.args))  # validated before anything starts
    from glm_rl.train import summarize
    from glm_rl.train import train as run_train

    out = run_train(cfg)
    s = summarize(out)
    console.print(
        f"done: {s['steps']} steps, mean reward first 5 {s['reward_first']:.3f} -> last 5 "
        f"{s['reward_last']:.3f}; metrics {out / 'metrics.jsonl'}, report {out / 'report.png'}"
    )


@app.command("eval")
def eval_cmd(
    hf_checkpoint: Path = typer.Option(TINY_CHECKPOINT, help="HF checkpoint directory"),
    prompt_data: Path = typer.Option(TINY_DATA / "eval.jsonl", help="JSONL, Parquet or a datasets directory"),
    input_key: str = typer.Option("prompt", help="the prompt's field (a string or chat messages)"),
    label_key: str = typer.Option("label", help="the label's field"),
    metadata_key: str = typer.Option("metadata", help="the metadata field (reaches the reward function)"),
    tool_key: str = typer.Option("tools", help="the tool-schema field (handed to the chat template)"),
    apply_chat_template: bool = typer.Option(True, help="render prompts with the checkpoint's chat template"),
    rm_type: str = typer.Option("arithmetic", help="rule grader (see `glm-rl train --help`, --rm-type)"),
    temperature: float = typer.Option(1.0, help="sampling temperature (0 = greedy)"),
    max_new_tokens: int = typer.Option(16),
    seed: int = typer.Option(0),
    preset: str | None = typer.Option(None, help="check the checkpoint against this preset first"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Accuracy of a checkpoint on a prompt set (HF reference sampler; prompts rendered as the rollout does)."""
    from glm_rl.evaluate import evaluate
    from glm_rl.models.glm45.checkpoint import load_hf_model
    from glm_rl.rollout.data import load_prompts
    from glm_rl.rollout.rewards import get_reward_fn, is_rule
    from glm_rl.rollout.rewards.rule import unknown_rm_type_message

    if not is_rule(rm_type):
        raise ValueError(unknown_rm_type_message(rm_type) + " (glm-rl eval grades with rule graders)")
    reward_fn = get_reward_fn(rm_type)
    rows = load_prompts(
        prompt_data,
        input_key,
        label_key,
        metadata_key=metadata_key,
        tool_key=tool_key,
        apply_chat_template=apply_chat_template,
    )
    model, tokenizer = load_hf_model(hf_checkpoint, preset=preset)
    result = evaluate(
        model,
        tokenizer,
        rows,
        reward_fn,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        apply_chat_template=apply_chat_template,
    )
    summary = {"accuracy": result.accuracy, "n": result.n, "temperature": temperature}
    typer.echo(
        json.dumps(summary)
        if as_json
        else f"accuracy {result.accuracy:.3f} on {result.n} prompts at temperature {temperature}"
    )


@app.command("reward-server")
def reward_server(
    rm_type: str = typer.Option(
        "math", help="the rule grader to serve (arithmetic, math, dapo, deepscaler, f1, random, boxed_<grader>)"
    ),
    custom_rm_path: str | None = typer.Option(None, help="serve this function (package.module.function) instead"),
    group_rm: bool = typer.Option(False, "--group-rm", help="the custom function scores a group at a time"),
    host: str = typer.Option("127.0.0.1", help="address to bind"),
    port: int = typer.Option(8000, help="0 picks a free port (printed at start)"),
    reward_key: str = typer.Option("reward", help="the key of the reward in each reply"),
    math_timeout_s: float = typer.Option(5.0, help="math graders: time limit of one comparison"),
) -> None:
    """Serve a grader over HTTP for `glm-rl train --rm-type remote_rm --rm-url http://HOST:PORT/reward`."""
    from glm_rl.rollout.rewards.server import serve

    serve(
        rm_type,
        custom_rm_path=custom_rm_path,
        group_rm=group_rm,
        host=host,
        port=port,
        reward_key=reward_key,
        math_timeout_s=math_timeout_s,
    )


@app.command()
def generate(
    prompt_file: Path | None = typer.Option(None, help="JSONL with `prompt` per line, or plain text lines"),
    prompt: list[str] | None = typer.Option(None, "--prompt", help="a prompt (repeatable), instead of a file"),
    hf_checkpoint: Path = typer.Option(
        TINY_CHECKPOINT,
        "--hf-checkpoint",
        "--hf-model",
        help="HF checkpoint directory (with --megatron-path: its tokenizer)",
    ),
    megatron_path: Path | None = typer.Option(
        None, help="greedy decoding straight from this Megatron torch_dist checkpoint (`glm-rl convert import`)"
    ),
    enable_mtp: bool = typer.Option(False, "--enable-mtp", help="MTP speculative decoding"),
    speculative_num_steps: int = typer.Option(1, help="MTP drafts per verify forward (with --enable-mtp)"),
    temperature: float | None = typer.Option(
        None, help="sampling temperature (0 = greedy) [default: 1.0; greedy with --megatron-path]"
    ),
    top_p: float = typer.Option(1.0),
    top_k: int = typer.Option(-1),
    max_new_tokens: int = typer.Option(32, help="clipped to the model's context"),
    chat_template: bool = typer.Option(True, help="wrap each prompt as a user turn (as the rollout does)"),
    dtype: str = typer.Option("float32"),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Generate with the embedded engine in-process (no Ray): tokens, text, logprobs, speculation stats.
    With --megatron-path: greedy text from a torch_dist checkpoint (Megatron's model, same output as HF)."""
    from glm_rl.generate import generate_engine, generate_megatron, read_prompts

    texts = read_prompts(prompt_file, prompt)
    if megatron_path is not None:
        generate_megatron(
            megatron_path,
            hf_checkpoint,
            texts,
            max_new_tokens=max_new_tokens,
            chat_template=chat_template,
            temperature=temperature,
            enable_mtp=enable_mtp,
            as_json=as_json,
        )
        return
    generate_engine(
        hf_checkpoint,
        texts,
        dtype=dtype,
        seed=seed,
        enable_mtp=enable_mtp,
        speculative_num_steps=speculative_num_steps,
        temperature=1.0 if temperature is None else temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        chat_template=chat_template,
        as_json=as_json,
    )


from glm_rl.planner.command import plan_command  # noqa: E402  (the command's flags live with it)

app.command("plan")(plan_command)


convert_app = typer.Typer(no_args_is_help=True, help="HF <-> Megatron torch_dist checkpoints (glm_rl/convert.py).")
app.add_typer(convert_app, name="convert")


@convert_app.command("import")
def convert_import(
    hf_model: Path = typer.Option(..., help="HF GLM-4.5 checkpoint directory"),
    megatron_path: Path = typer.Option(..., help="torch_dist output directory (new or empty)"),
    model_preset: str | None = typer.Option(None, help="check the HF config against this preset first"),
    tensor_model_parallel_size: int = typer.Option(1, help="TP of the ranks that write (any layout loads it)"),
    pipeline_model_parallel_size: int = typer.Option(1),
    context_parallel_size: int = typer.Option(1),
    expert_model_parallel_size: int = typer.Option(1),
    expert_tensor_parallel_size: int = typer.Option(1),
    decoder_first_pipeline_num_layers: int | None = typer.Option(None),
    decoder_last_pipeline_num_layers: int | None = typer.Option(None),
) -> None:
    """HF checkpoint -> Megatron torch_dist (spawns the layout's ranks on this host; torchrun: see tools/)."""
    from glm_rl.convert import check_import, import_checkpoint

    job = check_import(
        hf_model,
        megatron_path,
        flags=("--hf-model", "--megatron-path"),
        model_preset=model_preset,
        tp=tensor_model_parallel_size,
        pp=pipeline_model_parallel_size,
        cp=context_parallel_size,
        ep=expert_model_parallel_size,
        etp=expert_tensor_parallel_size,
        decoder_first_pipeline_num_layers=decoder_first_pipeline_num_layers,
        decoder_last_pipeline_num_layers=decoder_last_pipeline_num_layers,
    )
    import_checkpoint(job, in_process=True)  # one rank: this CLI process does the work
    typer.echo(f"wrote torch_dist checkpoint {job.save}")


@convert_app.command("export")
def convert_export(
    hf_model: Path = typer.Option(..., help="HF checkpoint of the same architecture: config, tokenizer, layout"),
    megatron_path: Path = typer.Option(..., help="torch_dist checkpoint directory"),
    hf_path: Path = typer.Option(..., help="HF output directory (new or empty)"),
) -> None:
    """Megatron torch_dist -> HF checkpoint (safetensors laid out as --hf-model's, its config and tokenizer)."""
    from glm_rl.convert import check_export, export_checkpoint

    job = check_export(megatron_path, hf_model, hf_path, flags=("--hf-model", "--hf-path"))
    export_checkpoint(job, in_process=True)
    typer.echo(f"wrote HF checkpoint {job.save}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def recipe(
    ctx: typer.Context,
    name: str = typer.Option(..., "--recipe", help="recipe name, e.g. glm45_tiny_pretrain (see glm_rl/recipes)"),
    pretrained_checkpoint: Path | None = typer.Option(
        None, help="HF checkpoint dir to start from (finetune; pretrain: continued pretraining)"
    ),
    output_dir: Path | None = typer.Option(None, help="run dir (default: checkpoint.save, else runs/NAME)"),
) -> None:
    """Pretrain / SFT / LoRA / DoRA recipe on the Megatron model; extra args are dotted `key=value` overrides
    (e.g. `train.global_batch_size=128 peft=lora`). Runs under `torchrun --nproc-per-node N`."""
    from glm_rl.recipes.config import apply_overrides, get_recipe, validate

    overrides = list(ctx.args)
    if pretrained_checkpoint:  # as the `pretrained_checkpoint=DIR` override: finetune and pretrain recipes alike
        overrides.insert(0, f"pretrained_checkpoint={pretrained_checkpoint}")
    cfg = validate(apply_overrides(get_recipe(name), overrides))  # before any process group
    from glm_rl.recipes.runner import run_recipe

    out = run_recipe(cfg, output_dir)
    console.print(f"done: metrics {out / 'metrics.jsonl'}, HF weights {out / 'hf'}")


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
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
