"""Typer launchers for the GLM-4.5 recipes: pick the layout for the node count, check it with `glm-rl plan`,
prepare checkpoints, start Ray, submit `glm-rl train`.

`launchers/run_glm45_355b_a32b.py` and `launchers/run_glm45_air_106b_a12b.py` are two-line scripts over this
module: the recipes differ only in a table (`Recipe`, `glm_rl/launch_recipes.py`), and living in the package lets
the tests import it and `glm-rl plan`'s checks run in-process before any command does.

Every command is a `list[str]`; `--dry-run` prints them (snapshot-tested). Steps whose output already exists
(FP8 checkpoint, torch_dist checkpoint) are skipped. The `glm-rl train` flags are the names
`glm_rl/config/` parses.

Hosts come from a hostfile whose names are checked before anything runs; every remote command, the Ray commands
and the Ray auth token come from `glm_rl/launch_remote.py` (quoting and token-on-stdin rules: see there).
launchers/lib/common.sh, the bash launcher, does the same.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import typer

from glm_rl.cluster import HARDWARE, Host, get_hardware, parse_hostfile, uniform_slots
from glm_rl.launch_recipes import GLM45_355B, GLM45_AIR, MAX_RESPONSE_LEN, PROMPT_LEN, Recipe
from glm_rl.launch_remote import (
    AUTH_MODES,
    DASHBOARD_PORT,
    HOST_RE,
    RAY_PORT,
    RUNTIME_ENV,
    LaunchError,
    auth_token,
    check_host_names,
    ray_commands,
    remote_command,
    remote_words,
    submit_command,
)
from glm_rl.models.glm45.presets import get_preset
from glm_rl.parallel import LayoutError, ParallelLayout
from glm_rl.planner.estimate import PlanError, PlanInput, make_plan


@dataclass(frozen=True)
class Options:
    num_nodes: int
    hardware: str = "H100"
    enable_mtp: bool = False
    enable_mis: bool = False
    rollout_fp8: bool = False
    algorithm: str = "gspo"
    hf_checkpoint: str | None = None  # default: models/<the recipe's HF name>
    work_dir: str = "runs"
    prompt_data: str = "data/prompts.jsonl"
    hostfile: str | None = None
    head: str | None = None  # head address without a hostfile (single node)
    remote_shell: str = "ssh"
    ray_auth_mode: str = "token"  # RAY_AUTH_MODE on every node: token or disabled
    dry_run: bool = False


# -- steps ----------------------------------------------------------------------------------------------------
def cluster(opts: Options) -> tuple[list[Host], int]:
    """Hosts and GPUs per node: from the hostfile (its host count must equal --num-nodes), else named node0..."""
    hw = get_hardware(opts.hardware)
    if opts.hostfile:
        check_host_names(opts.hostfile)
        hosts = parse_hostfile(opts.hostfile)
        if len(hosts) != opts.num_nodes:
            raise LaunchError(
                f"--hostfile {opts.hostfile} lists {len(hosts)} hosts but --num-nodes is {opts.num_nodes}"
            )
        return hosts, uniform_slots(hosts, opts.hostfile)
    if opts.num_nodes > 1:
        raise LaunchError(f"--num-nodes {opts.num_nodes} needs --hostfile (which hosts to start Ray on)")
    return [Host(opts.head or "127.0.0.1", hw.gpus_per_node)], hw.gpus_per_node


def check_recipe(recipe: Recipe, opts: Options, gpus_per_node: int) -> tuple[ParallelLayout, PlanInput]:
    """The layout for this node count, checked by `glm-rl plan` (no sync pricing): LaunchError says why not."""
    if opts.num_nodes < 1:
        raise LaunchError(f"--num-nodes must be >= 1 (got {opts.num_nodes})")
    if opts.algorithm not in ("gspo", "grpo"):
        raise LaunchError(f"--algorithm {opts.algorithm!r}: expected gspo or grpo")
    if opts.ray_auth_mode not in AUTH_MODES:
        raise LaunchError(f"--ray-auth-mode / RAY_AUTH_MODE {opts.ray_auth_mode!r}: expected token or disabled")
    hw = get_hardware(opts.hardware)
    layout = recipe.layout_for_gpus(opts.num_nodes * gpus_per_node)
    inp = PlanInput(
        spec=get_preset(recipe.preset),
        hardware=hw,
        num_nodes=opts.num_nodes,
        gpus_per_node=gpus_per_node,
        layout=layout,
        max_tokens_per_gpu=recipe.max_tokens_per_gpu[hw.name],
        recompute_granularity="full",
        optimizer_cpu_offload=True,
        enable_mtp_training=opts.enable_mtp,
        colocate=True,
        rollout_num_gpus_per_engine=recipe.gpus_per_engine[hw.name],
        enable_mtp=opts.enable_mtp,
        mem_fraction_static=recipe.mem_fraction[hw.name],
        update_weight_transfer_mode="p2p",
    )
    where = f"{recipe.preset} on --num-nodes {opts.num_nodes} x {gpus_per_node} {hw.name} (layout {_describe(layout)})"
    try:
        plan = make_plan(inp, with_sync=False)
    except (PlanError, LayoutError) as e:
        raise LaunchError(f"{where} is not a valid layout:\n  - " + "\n  - ".join(e.problems)) from None
    if not plan.fits:
        raise LaunchError(f"{where} does not fit (glm-rl plan):\n  - " + "\n  - ".join(plan.problems))
    world = opts.num_nodes * gpus_per_node
    return ParallelLayout.for_world_size(world, **{k: getattr(layout, k) for k in _LAYOUT_FIELDS}), inp


_LAYOUT_FIELDS = (
    "tp",
    "pp",
    "cp",
    "ep",
    "etp",
    "sequence_parallel",
    "decoder_first_pipeline_num_layers",
    "decoder_last_pipeline_num_layers",
)


def _describe(lo: ParallelLayout) -> str:
    ends = (
        f", first/last stage {lo.decoder_first_pipeline_num_layers}/{lo.decoder_last_pipeline_num_layers} layers"
        if lo.decoder_first_pipeline_num_layers
        else ""
    )
    return f"TP{lo.tp} PP{lo.pp} CP{lo.cp} EP{lo.ep} ETP{lo.etp}{' SP' if lo.sequence_parallel else ''}{ends}"


def paths(recipe: Recipe, opts: Options) -> dict[str, str]:
    work = opts.work_dir.rstrip("/")
    return {
        "hf": opts.hf_checkpoint or f"models/{recipe.hf_name}",
        "fp8": f"{work}/{recipe.hf_name}-FP8",
        "torch_dist": f"{work}/{recipe.hf_name}_torch_dist",
        "save": f"{work}/{recipe.hf_name}_rl",
        "output": f"{work}/outputs/{recipe.preset}",
    }


def prepare_commands(
    recipe: Recipe, opts: Options, gpus_per_node: int, exists: Callable[[str], bool] = lambda p: Path(p).exists()
) -> list[list[str]]:
    """Checkpoint conversions still to do (a step whose output directory exists is skipped)."""
    p, cmds = paths(recipe, opts), []
    if opts.rollout_fp8 and not exists(p["fp8"]):
        cmds.append(["python", "tools/convert_hf_to_fp8.py", "--hf-checkpoint", p["hf"], "--save", p["fp8"]])
    if not exists(p["torch_dist"]):
        cmds.append(
            [
                "torchrun",
                "--nproc-per-node",
                str(gpus_per_node),
                "tools/convert_hf_to_torch_dist.py",
                "--hf-checkpoint",
                p["hf"],
                "--save",
                p["torch_dist"],
                "--model-preset",
                recipe.preset,
                "--expert-model-parallel-size",
                str(gpus_per_node),
            ]
        )
    return cmds


def train_args(recipe: Recipe, opts: Options, layout: ParallelLayout, inp: PlanInput, head: str) -> list[str]:
    """The `glm-rl train` flags of this run (names as glm_rl/config/ parses them)."""
    p = paths(recipe, opts)
    world = inp.num_nodes * inp.gpus_per_node
    args = [
        "--backend",
        "megatron",
        "--hf-checkpoint",
        p["hf"],
        "--model-preset",
        recipe.preset,
        "--ref-load",
        p["torch_dist"],
        "--load",
        p["torch_dist"],
        "--save",
        p["save"],
        "--output-dir",
        p["output"],
        "--prompt-data",
        opts.prompt_data,
        "--num-trainer-ranks",
        str(world),
        *layout.megatron_args(),
        "--max-tokens-per-gpu",
        str(inp.max_tokens_per_gpu),
        "--rollout-max-prompt-len",
        str(PROMPT_LEN),
        "--rollout-max-response-len",
        str(min(MAX_RESPONSE_LEN, inp.max_tokens_per_gpu - PROMPT_LEN)),
        "--advantage-estimator",
        opts.algorithm,
    ]
    args += _clip_args(opts.algorithm)
    args += list(recipe.train_flags)
    args += _rollout_args(recipe, inp, head)
    return args + _feature_args(opts, p)


def _clip_args(algorithm: str) -> list[str]:
    """PPO clip range: GSPO's sequence-level ratio needs a much tighter clip than GRPO's token-level one."""
    if algorithm == "gspo":
        return ["--eps-clip", "1e-4", "--eps-clip-high", "2e-4"]
    return ["--eps-clip", "0.2", "--eps-clip-high", "0.28"]


def _rollout_args(recipe: Recipe, inp: PlanInput, head: str) -> list[str]:
    """Rollout engines (count, size, memory fraction) and the Ray cluster to run on."""
    engines = inp.num_nodes * inp.gpus_per_node // inp.rollout_num_gpus_per_engine
    return [
        "--num-engines",
        str(engines),
        "--rollout-num-gpus-per-engine",
        str(inp.rollout_num_gpus_per_engine),
        "--sglang-mem-fraction-static",
        str(recipe.mem_fraction[inp.hardware.name]),
        "--ray-address",
        f"{head}:{RAY_PORT}",
    ]


def _feature_args(opts: Options, p: dict[str, str]) -> list[str]:
    """The optional features: masked importance sampling, MTP (speculative rollout + training), FP8 rollout."""
    args = []
    if opts.enable_mis:
        args += ["--enable-mis"]
    if opts.enable_mtp:
        args += [
            "--enable-mtp",
            "--speculative-num-steps",
            "2",
            "--enable-mtp-training",
            "--mtp-loss-scaling-factor",
            "0.2",
        ]
    if opts.rollout_fp8:  # engines start from the FP8 copy; syncs send FP8 blocks
        args += ["--rollout-fp8", "--sglang-model-path", p["fp8"]]
    return args


def commands(
    recipe: Recipe, opts: Options, exists: Callable[[str], bool] = lambda p: Path(p).exists()
) -> list[list[str]]:
    """Every command of the run, in order (validation first: a refused run builds none)."""
    hosts, per_node = cluster(opts)
    layout, inp = check_recipe(recipe, opts, per_node)
    head = hosts[0].name
    return (
        prepare_commands(recipe, opts, per_node, exists)
        + ray_commands(hosts, per_node, opts.remote_shell, opts.ray_auth_mode)
        + [submit_command(head, train_args(recipe, opts, layout, inp, head), opts.ray_auth_mode)]
    )


# -- running --------------------------------------------------------------------------------------------------
def wait_for_nodes(address: str, count: int, timeout_s: float = 300.0) -> None:
    """Block until `count` alive nodes have joined, printing progress."""
    import ray

    ray.init(address=address, logging_level="ERROR")
    try:
        start = time.monotonic()
        while True:
            alive = sum(1 for n in ray.nodes() if n.get("Alive"))
            print(f"ray: {alive}/{count} nodes joined ({time.monotonic() - start:.0f} s)", flush=True)
            if alive >= count:
                return
            if time.monotonic() - start > timeout_s:
                raise LaunchError(f"only {alive} of {count} Ray nodes joined within {timeout_s:.0f} s")
            time.sleep(5)
    finally:
        ray.shutdown()


def run(recipe: Recipe, opts: Options) -> None:
    cmds = commands(recipe, opts)
    if opts.dry_run:
        for cmd in cmds:
            print(shlex.join(cmd))
        return
    hosts, _ = cluster(opts)
    token = auth_token(opts.ray_auth_mode)
    os.environ["RAY_AUTH_MODE"] = opts.ray_auth_mode  # wait_for_nodes connects from this process
    remote = [*shlex.split(opts.remote_shell), "--"]
    for i, cmd in enumerate(cmds, 1):
        print(f"[{i}/{len(cmds)}] {shlex.join(cmd)}", flush=True)
        if cmd[2:5] == ["ray", "job", "submit"]:
            wait_for_nodes(f"{hosts[0].name}:{RAY_PORT}", len(hosts))
        stdin = f"{token}\n" if token and cmd[: len(remote)] == remote else None  # for remote_words' `read`
        subprocess.run(cmd, check=True, input=stdin, text=True)


def make_app(recipe: Recipe) -> typer.Typer:
    """The launcher CLI for one recipe."""
    app = typer.Typer(add_completion=False, help=f"Launch RL training of {recipe.preset} on a Ray cluster.")

    @app.command()
    def main(
        num_nodes: int = typer.Option(..., help="nodes (8 GPUs each; GB200: 4)"),
        hardware: str = typer.Option("H100", help=f"{', '.join(HARDWARE)}"),
        enable_mtp: bool = typer.Option(False, "--enable-mtp", help="MTP speculative rollout + MTP training"),
        enable_mis: bool = typer.Option(False, "--enable-mis", help="masked importance sampling"),
        rollout_fp8: bool = typer.Option(False, "--rollout-fp8", help="FP8 rollout (converts once)"),
        algorithm: str = typer.Option("gspo", help="gspo or grpo"),
        hf_checkpoint: str | None = typer.Option(None, help=f"HF checkpoint (default models/{recipe.hf_name})"),
        work_dir: str = typer.Option("runs", help="converted checkpoints, saves and outputs go here"),
        prompt_data: str = typer.Option("data/prompts.jsonl", help="JSONL prompts"),
        hostfile: str | None = typer.Option(None, help="MPI hostfile (`host slots=N`); first host = head"),
        remote_shell: str = typer.Option("ssh", help="runs a command on a host, as REMOTE_SHELL -- HOST LINE"),
        ray_auth_mode: str = typer.Option(
            "token", envvar="RAY_AUTH_MODE", help="token (this host's token goes to every node) or disabled"
        ),
        dry_run: bool = typer.Option(False, "--dry-run", help="print every command, run none"),
    ) -> None:
        opts = Options(
            num_nodes=num_nodes,
            hardware=hardware,
            enable_mtp=enable_mtp,
            enable_mis=enable_mis,
            rollout_fp8=rollout_fp8,
            algorithm=algorithm,
            hf_checkpoint=hf_checkpoint,
            work_dir=work_dir,
            prompt_data=prompt_data,
            hostfile=hostfile,
            remote_shell=remote_shell,
            ray_auth_mode=ray_auth_mode,
            dry_run=dry_run,
        )
        try:
            run(recipe, opts)
        except (LaunchError, ValueError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return app


# Re-exported: the recipes and the remote-command builders, imported from here by tests and launchers.
__all__ = [
    "GLM45_355B",
    "GLM45_AIR",
    "Options",
    "Recipe",
    "LaunchError",
    "commands",
    "make_app",
    "AUTH_MODES",
    "DASHBOARD_PORT",
    "HOST_RE",
    "RAY_PORT",
    "RUNTIME_ENV",
    "auth_token",
    "check_host_names",
    "ray_commands",
    "remote_command",
    "remote_words",
    "submit_command",
]
