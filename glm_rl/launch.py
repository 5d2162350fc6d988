"""Typer launchers for the GLM-4.5 recipes: pick the layout for the node count, check it with `glm-rl plan`,
prepare checkpoints, start Ray, submit `glm-rl train`.

`launchers/run_glm45_355b_a32b.py` and `launchers/run_glm45_air_106b_a12b.py` are two-line scripts over this
module: the recipes differ only in a table (`Recipe`), and living in the package lets the tests import it and
`glm-rl plan`'s checks run in-process before any command does.

Every command is a `list[str]`; `--dry-run` prints them (snapshot-tested). Steps whose output already exists
(FP8 checkpoint, torch_dist checkpoint) are skipped. The `glm-rl train` flags are the names
`glm_rl/config/` parses.

Hosts come from a hostfile whose names are checked (`HOST_RE`) before anything runs, and every remote command is
`REMOTE_SHELL -- HOST WORDS...`, every word quoted: a name cannot reach ssh as an option nor a shell as syntax. Ray runs
with token auth (`--ray-auth-mode`, default token) on every node: local commands carry `RAY_AUTH_MODE`, and each
remote `ray start` reads the launcher's token from stdin (never from a command line, which `ps` and `--dry-run`
show). launchers/lib/common.sh, the bash launcher, does the same.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import typer

from glm_rl.cluster import HARDWARE, Host, get_hardware, parse_hostfile, uniform_slots
from glm_rl.models.glm45.presets import get_preset
from glm_rl.parallel import LayoutError, ParallelLayout
from glm_rl.planner.estimate import PlanError, PlanInput, make_plan

RAY_PORT, DASHBOARD_PORT = 6379, 8265
AUTH_MODES = ("token", "disabled")
# A host name or an IP address: letters, digits, '.', '-', ':', '_', never a leading '-' (ssh would take it for an
# option) nor anything a shell interprets. launchers/lib/common.sh applies the same rule.
HOST_RE = re.compile(r"[A-Za-z0-9_:][A-Za-z0-9_.:-]{0,252}")
# Variables every Ray worker gets (runtime env): NCCL's RDMA settings and Ray's own.
RUNTIME_ENV = {
    "NCCL_CUMEM_ENABLE": "0",
    "NCCL_NVLS_ENABLE": "0",
    "NCCL_IB_TIMEOUT": "22",
    "NCCL_DEBUG": "WARN",
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    "RAY_DEDUP_LOGS": "0",
    "PYTHONUNBUFFERED": "1",
}


class LaunchError(ValueError):
    """A run the launcher refuses, with the reason."""


@dataclass(frozen=True)
class Recipe:
    """One model's table: layouts by node count, rollout sizing per hardware, and the fixed flags."""

    preset: str
    hf_name: str  # directory name under --work-dir
    layout_for_gpus: Callable[[int], ParallelLayout]  # by GPU count; DP derived later
    gpus_per_engine: dict[str, int]  # hardware -> SGLang engine size
    mem_fraction: dict[str, float]  # hardware -> --sglang-mem-fraction-static
    max_tokens_per_gpu: dict[str, int]  # hardware -> trainer micro-batch tokens
    train_flags: tuple[str, ...] = field(default=())


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


# -- recipes --------------------------------------------------------------------------------------------------
def _layout_355b(gpus: int) -> ParallelLayout:
    """<= 32 GPUs (4 nodes of 8): TP4 PP1 CP1 EP4, the issue's small table, which `plan` refuses for the full
    model (the error says by how much); more: TP4 PP8 CP2 EP8 (64 GPUs and multiples), 92 layers as
    10 + 6 x 12 + 10."""
    if gpus <= 32:
        return ParallelLayout(tp=4, pp=1, cp=1, ep=4, etp=1, sequence_parallel=True)
    return ParallelLayout(
        tp=4,
        pp=8,
        cp=2,
        ep=8,
        etp=1,
        sequence_parallel=True,
        decoder_first_pipeline_num_layers=10,
        decoder_last_pipeline_num_layers=10,
    )


def _layout_air(gpus: int) -> ParallelLayout:
    """TP1 PP4 (46 layers as 11 + 12 + 12 + 11), EP4 up to 16 GPUs, EP8 from 32 (DP grows with the GPUs)."""
    return ParallelLayout(
        tp=1,
        pp=4,
        cp=1,
        ep=4 if gpus <= 16 else 8,
        etp=1,
        decoder_first_pipeline_num_layers=11,
        decoder_last_pipeline_num_layers=11,
    )


# Colocated, but weights move with p2p: config.py keeps the CUDA-IPC `tensor` path for the torch backend only.
_COMMON = (
    "--dtype",
    "bfloat16",
    "--use-tis",
    "--use-rollout-routing-replay",
    "--recompute-granularity",
    "full",
    "--recompute-method",
    "uniform",
    "--recompute-num-layers",
    "1",
    "--optimizer-cpu-offload",
    "--colocate",
    "--update-weight-transfer-mode",
    "p2p",
    "--rollout-engine",
    "sglang",
    "--kl-loss-coef",
    "0.0",
    "--num-rollout",
    "3000",
    "--save-interval",
    "20",
)
PROMPT_LEN, MAX_RESPONSE_LEN = 2048, 8192

GLM45_355B = Recipe(
    preset="glm45-355b-a32b",
    hf_name="GLM-4.5",
    layout_for_gpus=_layout_355b,
    gpus_per_engine={"H100": 32, "H200": 16, "B200": 16, "GB200": 16},
    mem_fraction={"H100": 0.7, "H200": 0.7, "B200": 0.75, "GB200": 0.75},
    max_tokens_per_gpu={"H100": 16384, "H200": 16384, "B200": 16384, "GB200": 16384},
    train_flags=_COMMON
    + (
        "--moe-token-dispatcher-type",
        "flex",
        "--moe-enable-deepep",
        "--rollout-batch-size",
        "64",
        "--n-samples-per-prompt",
        "8",
        "--global-batch-size",
        "512",
        "--lr",
        "1e-6",
    ),
)

GLM45_AIR = Recipe(
    preset="glm45-air-106b-a12b",
    hf_name="GLM-4.5-Air",
    layout_for_gpus=_layout_air,
    gpus_per_engine={"H100": 8, "H200": 8, "B200": 4, "GB200": 4},
    mem_fraction={"H100": 0.7, "H200": 0.75, "B200": 0.75, "GB200": 0.75},
    max_tokens_per_gpu={"H100": 8192, "H200": 16384, "B200": 16384, "GB200": 16384},
    train_flags=_COMMON
    + (
        "--moe-token-dispatcher-type",
        "alltoall",
        "--rollout-batch-size",
        "32",
        "--n-samples-per-prompt",
        "8",
        "--global-batch-size",
        "256",
        "--lr",
        "1e-6",
    ),
)


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


def check_host_names(path: str) -> None:
    """Every host of the hostfile matches HOST_RE; the error names the line. Runs before the hostfile is parsed,
    so a hostile name is refused before anything takes it for a host."""
    if not Path(path).is_file():
        return  # parse_hostfile says so
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if words and not HOST_RE.fullmatch(words[0]):
            raise LaunchError(
                f"hostfile {path}:{number}: '{words[0]}' is not a host name or IP address "
                "(letters, digits, '.', '-', ':', '_'; not starting with '-')"
            )


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


def remote_words(argv: list[str], auth_mode: str = "token") -> list[str]:
    """What a host runs, as words its shell gets joined by spaces (ssh's contract): Ray's auth mode; in token mode
    the token, read from stdin (`run` sends it); then the command, every word quoted."""
    words = [f"export RAY_AUTH_MODE={shlex.quote(auth_mode)};"]
    if auth_mode == "token":
        words.append("IFS= read -r RAY_AUTH_TOKEN && export RAY_AUTH_TOKEN;")
    return words + [shlex.quote(w) for w in argv]


def remote_command(remote_shell: str, host: str, argv: list[str], auth_mode: str = "token") -> list[str]:
    """`argv` on `host`: `--` ends the remote shell's options, so the host is never read as one."""
    return [*shlex.split(remote_shell), "--", host, *remote_words(argv, auth_mode)]


def ray_commands(
    hosts: list[Host], gpus_per_node: int, remote_shell: str = "ssh", auth_mode: str = "token"
) -> list[list[str]]:
    """Ray head here (run the launcher on the hostfile's first host), workers over the remote shell."""
    head = hosts[0].name
    cmds = [
        [
            "env",
            f"RAY_AUTH_MODE={auth_mode}",
            "ray",
            "start",
            "--head",
            "--port",
            str(RAY_PORT),
            "--num-gpus",
            str(gpus_per_node),
            "--dashboard-host",
            "0.0.0.0",
            "--dashboard-port",
            str(DASHBOARD_PORT),
            "--disable-usage-stats",
        ]
    ]
    for h in hosts[1:]:
        cmds.append(
            remote_command(
                remote_shell,
                h.name,
                [
                    "ray",
                    "start",
                    "--address",
                    f"{head}:{RAY_PORT}",
                    "--num-gpus",
                    str(gpus_per_node),
                    "--disable-usage-stats",
                ],
                auth_mode,
            )
        )
    return cmds


def train_args(recipe: Recipe, opts: Options, layout: ParallelLayout, inp: PlanInput, head: str) -> list[str]:
    """The `glm-rl train` flags of this run (names as glm_rl/config/ parses them)."""
    p, hw = paths(recipe, opts), inp.hardware.name
    world = inp.num_nodes * inp.gpus_per_node
    engines = world // inp.rollout_num_gpus_per_engine
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
    if opts.algorithm == "gspo":  # GSPO's sequence-level ratio needs a much tighter clip
        args += ["--eps-clip", "1e-4", "--eps-clip-high", "2e-4"]
    else:
        args += ["--eps-clip", "0.2", "--eps-clip-high", "0.28"]
    args += list(recipe.train_flags)
    args += [
        "--num-engines",
        str(engines),
        "--rollout-num-gpus-per-engine",
        str(inp.rollout_num_gpus_per_engine),
        "--sglang-mem-fraction-static",
        str(recipe.mem_fraction[hw]),
        "--ray-address",
        f"{head}:{RAY_PORT}",
    ]
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


def submit_command(head: str, args: list[str], auth_mode: str = "token") -> list[str]:
    env = {"env_vars": RUNTIME_ENV}
    return [
        "env",
        f"RAY_AUTH_MODE={auth_mode}",
        "ray",
        "job",
        "submit",
        "--address",
        f"http://{head}:{DASHBOARD_PORT}",
        "--runtime-env-json",
        json.dumps(env, sort_keys=True),
        "--",
        "glm-rl",
        "train",
        *args,
    ]


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


def auth_token(auth_mode: str) -> str | None:
    """The token every node gets (token mode): RAY_AUTH_TOKEN, else the file at RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token, where Ray itself looks."""
    if auth_mode != "token":
        return None
    token = os.environ.get("RAY_AUTH_TOKEN", "")
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.is_file() else ""
        if not token:
            raise LaunchError(
                f"RAY_AUTH_MODE=token but no token at {path}: run `ray get-auth-token --generate` "
                "(or pass --ray-auth-mode disabled on a trusted network)"
            )
    if len(token.split()) != 1:
        raise LaunchError("the Ray auth token is not one word (one line, no spaces)")
    return token


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


__all__ = ["GLM45_355B", "GLM45_AIR", "Options", "Recipe", "LaunchError", "commands", "make_app"]
