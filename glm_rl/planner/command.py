"""The `glm-rl plan` command: flags -> `PlanInput`, then a table (or `--json`) and the exit code.

Exit codes: 0 fits; 1 a valid layout that does not fit (the table says where); 2 a layout or input that cannot
run at all (every reason listed). The memory model and its assumptions are in `glm_rl/planner/estimate.py`,
the weight-sync model in `glm_rl/planner/sync.py`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from glm_rl.cluster import get_hardware, parse_hostfile, uniform_slots
from glm_rl.models.glm45.presets import get_preset
from glm_rl.parallel import LayoutError, ParallelLayout
from glm_rl.planner.estimate import Plan, PlanError, PlanInput, make_plan

HARDWARE_CHOICES = ("H100", "H200", "B200", "GB200")


def plan_command(
    model_preset: str = typer.Option("glm45-355b-a32b", help="model preset (glm-rl models lists them)"),
    num_nodes: int | None = typer.Option(None, help="nodes (default: the hostfile's hosts, else 1)"),
    gpus_per_node: int | None = typer.Option(None, help="GPUs per node (default: hostfile slots, else the hardware's)"),
    hostfile: Path | None = typer.Option(None, help="MPI hostfile (`host slots=N` lines) instead of nodes x GPUs"),
    hardware: str = typer.Option("H100", help=f"GPU kind: {', '.join(HARDWARE_CHOICES)}"),
    tensor_model_parallel_size: int = typer.Option(1),
    pipeline_model_parallel_size: int = typer.Option(1),
    context_parallel_size: int = typer.Option(1),
    expert_model_parallel_size: int = typer.Option(1),
    expert_tensor_parallel_size: int = typer.Option(1),
    sequence_parallel: bool | None = typer.Option(
        None, "--sequence-parallel/--no-sequence-parallel", help="default: on when TP > 1"
    ),
    decoder_first_pipeline_num_layers: int | None = typer.Option(None),
    decoder_last_pipeline_num_layers: int | None = typer.Option(None),
    max_tokens_per_gpu: int = typer.Option(16384, help="tokens per GPU per micro-batch (after the CP split)"),
    recompute_granularity: str | None = typer.Option(None, help="full or selective (default: none)"),
    recompute_method: str = typer.Option("uniform", help="with full: uniform or block"),
    recompute_num_layers: int = typer.Option(1),
    optimizer_cpu_offload: bool = typer.Option(False, "--optimizer-cpu-offload", help="Adam state on the host"),
    enable_mtp_training: bool = typer.Option(False, "--enable-mtp-training", help="train the MTP layer too"),
    colocate: bool = typer.Option(False, "--colocate", help="trainer and engines share every GPU"),
    rollout_num_gpus: int | None = typer.Option(None, help="GPUs for engines when not colocated"),
    rollout_num_gpus_per_engine: int = typer.Option(8, help="GPUs per SGLang engine"),
    enable_mtp: bool = typer.Option(False, "--enable-mtp", help="engines load the MTP layer"),
    sglang_mem_fraction_static: float = typer.Option(0.7, help="SGLang's static pool (weights + KV) fraction"),
    update_weight_transfer_mode: str = typer.Option("p2p", help="tensor, broadcast or p2p"),
    skip_sync: bool = typer.Option(False, "--skip-sync", help="do not price the weight sync (it takes seconds)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """Check a parallel layout and print per-GPU memory and predicted weight-sync time (exit 1: does not fit,
    2: invalid)."""
    flags = dict(locals())  # every flag above, by parameter name (`_plan_input` reads them)
    try:
        plan = make_plan(
            _plan_input(flags),
            with_sync=not skip_sync,
            progress=None if as_json else lambda msg: print(msg, file=sys.stderr, flush=True),
        )
    except (LayoutError, PlanError, ValueError) as e:
        _report_invalid(model_preset, getattr(e, "problems", None) or [str(e)], as_json)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(plan.to_dict() | {"valid": True}, indent=2))
    else:
        render(plan)
    if not plan.fits:
        raise typer.Exit(1)


def _plan_input(f: dict) -> PlanInput:
    """`plan_command`'s flags (by parameter name) -> the checked `PlanInput` (PlanError / LayoutError /
    ValueError when a flag is out of range)."""
    hw = get_hardware(f["hardware"])
    nodes, per_node = _cluster(f["num_nodes"], f["gpus_per_node"], f["hostfile"], hw.gpus_per_node)
    _check_choices(f["recompute_granularity"], f["recompute_method"], f["update_weight_transfer_mode"])
    tp, sequence_parallel = f["tensor_model_parallel_size"], f["sequence_parallel"]
    layout = ParallelLayout(
        tp=tp,
        pp=f["pipeline_model_parallel_size"],
        cp=f["context_parallel_size"],
        ep=f["expert_model_parallel_size"],
        etp=f["expert_tensor_parallel_size"],
        sequence_parallel=tp > 1 if sequence_parallel is None else sequence_parallel,
        decoder_first_pipeline_num_layers=f["decoder_first_pipeline_num_layers"],
        decoder_last_pipeline_num_layers=f["decoder_last_pipeline_num_layers"],
    )
    return PlanInput(
        spec=get_preset(f["model_preset"]),
        hardware=hw,
        num_nodes=nodes,
        gpus_per_node=per_node,
        layout=layout,
        max_tokens_per_gpu=f["max_tokens_per_gpu"],
        recompute_granularity=f["recompute_granularity"],
        recompute_method=f["recompute_method"],
        recompute_num_layers=f["recompute_num_layers"],
        optimizer_cpu_offload=f["optimizer_cpu_offload"],
        enable_mtp_training=f["enable_mtp_training"],
        colocate=f["colocate"],
        rollout_num_gpus=f["rollout_num_gpus"],
        rollout_num_gpus_per_engine=f["rollout_num_gpus_per_engine"],
        enable_mtp=f["enable_mtp"],
        mem_fraction_static=f["sglang_mem_fraction_static"],
        update_weight_transfer_mode=f["update_weight_transfer_mode"],
    )


def _check_choices(recompute_granularity: str | None, recompute_method: str, update_weight_transfer_mode: str) -> None:
    """The string flags with a fixed set of values (typer takes them as plain strings)."""
    for flag, value, choices in (
        ("--recompute-granularity", recompute_granularity, (None, "full", "selective")),
        ("--recompute-method", recompute_method, ("uniform", "block")),
        ("--update-weight-transfer-mode", update_weight_transfer_mode, ("tensor", "broadcast", "p2p")),
    ):
        if value not in choices:
            raise PlanError([f"{flag} {value!r}: expected one of {', '.join(c for c in choices if c)}"])


def _report_invalid(model_preset: str, problems: list[str], as_json: bool) -> None:
    """Exit-2 output: every reason the plan cannot run (stdout JSON, or a list on stderr)."""
    if as_json:
        typer.echo(json.dumps({"fits": False, "valid": False, "problems": problems}))
    else:
        typer.echo(f"invalid plan for {model_preset}:\n" + "\n".join(f"  - {p}" for p in problems), err=True)


def _cluster(
    num_nodes: int | None, gpus_per_node: int | None, hostfile: Path | None, default_gpus: int
) -> tuple[int, int]:
    if hostfile is not None:
        hosts = parse_hostfile(hostfile)
        slots = uniform_slots(hosts, hostfile)
        if num_nodes not in (None, len(hosts)) or gpus_per_node not in (None, slots):
            raise PlanError(
                [
                    f"--hostfile {hostfile} lists {len(hosts)} hosts x {slots} slots; it disagrees with "
                    f"--num-nodes {num_nodes} / --gpus-per-node {gpus_per_node}"
                ]
            )
        return len(hosts), slots
    nodes, per = num_nodes or 1, gpus_per_node or default_gpus
    if nodes < 1 or per < 1:
        raise PlanError([f"--num-nodes {nodes} and --gpus-per-node {per} must be >= 1"])
    return nodes, per


def hw_nic_gbps(plan: Plan) -> int:
    return round(get_hardware(plan.hardware).nic_bytes_s * 8 / 1e9)


def render(plan: Plan, console: Console | None = None) -> None:
    """Memory table, sync table, verdict."""
    console = console or Console(width=110)
    g, lo = plan.gpus, plan.layout
    sp = " SP" if lo["sequence_parallel"] else ""
    console.print(
        f"[bold]{plan.model}[/bold] on {g['nodes']} x {g['per_node']} {plan.hardware} "
        f"({g['trainer']} trainer GPUs{', colocated with' if g['colocate'] else ' +'} {g['rollout']} "
        f"rollout GPUs in {g['engines']} engines of {plan.engine['gpus_per_engine']})"
    )
    console.print(
        f"trainer layout TP{lo['tp']} PP{lo['pp']} CP{lo['cp']} EP{lo['ep']} ETP{lo['etp']} DP{lo['dp']}"
        f"{sp} (expert-DP {lo['expert_dp']}); layers per stage {plan.layers_per_stage}"
    )
    t, e = plan.trainer, plan.engine
    console.print(f"per-GPU memory (trainer: its heaviest stage, {t['stage']}, {t['params_b']:.2f} B params per GPU)")
    table = Table()
    table.add_column("item", min_width=34)
    table.add_column("GiB", justify="right")
    rows = [
        ("trainer weights (bf16)", t["weights"]),
        ("trainer grads (fp32 main grads)", t["grads"]),
        ("optimizer (fp32 master + Adam m, v)", t["optimizer"]),
        ("activations", t["activations"]),
        ("trainer peak", t["peak"]),
        ("engine weights (bf16)", e["weights"]),
        (f"engine KV cache ({e['kv_tokens']:,} tokens)", e["kv_cache"]),
        ("engine pool (weights + KV)", e["pool"]),
        ("total incl. reserve", plan.gpu_total_gib),
        (f"{plan.hardware} capacity", plan.gpu_capacity_gib),
    ]
    for name, value in rows:
        table.add_row(name, f"{value:.1f}")
    console.print(table)
    console.print(f"host memory per node: {plan.host_per_node_gib:.0f} GiB of {plan.host_capacity_gib:.0f} GiB")
    if plan.sync:
        s = plan.sync
        console.print(
            f"weight sync: {s['bytes_delivered'] / 1e9:.0f} GB delivered to the engines (model "
            f"{s['model_bytes'] / 1e9:.0f} GB bf16), one {hw_nic_gbps(plan)} Gb/s NIC per GPU"
        )
        sync = Table()
        sync.add_column("transport")
        sync.add_column("predicted s", justify="right")
        for name, sec in s["seconds"].items():
            label = name + (" (chosen)" if name == s["chosen"] else "")
            sync.add_row(label, "needs --colocate" if sec is None else f"{sec:.2f}")
        sync.add_row("physical floor", f"{s['floor_s']:.2f}")
        console.print(sync)
        console.print(f"p2p / floor = {s['p2p_over_floor']:.2f}")
    if plan.fits:
        console.print("[green]fits[/green]")
    else:
        console.print("[red]does not fit:[/red]\n" + "\n".join(f"  - {p}" for p in plan.problems))
