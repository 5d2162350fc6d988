"""Typer launchers (launchers/run_glm45_*.py over glm_rl/launch.py): every generated command is snapshot-tested
one argument per line (`pytest --update-snapshots` rewrites them; review the diff), and every generated
`glm-rl train` command parses through the real config parser. Nothing is started: the commands are built
with `--dry-run` semantics (Ray, SGLang and GPUs are not needed)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from glm_rl.config import SECTIONS, RunConfig, build_parser, split_sglang_args
from glm_rl.launch import GLM45_355B, GLM45_AIR, LaunchError, Options, commands, make_app

SNAPSHOTS = Path(__file__).parent / "snapshots"
RECIPES = {"355b": GLM45_355B, "air": GLM45_AIR}
CASES = {  # name: (recipe, nodes, extra options)
    "355b_8nodes_mtp_mis_fp8": ("355b", 8, {"enable_mtp": True, "enable_mis": True, "rollout_fp8": True}),
    "air_4nodes": ("air", 4, {}),
    "air_8nodes_h200_grpo": ("air", 8, {"hardware": "H200", "algorithm": "grpo"}),
    "355b_16nodes_gb200": ("355b", 16, {"hardware": "GB200"}),  # 4-GPU trays: 64 GPUs
}
ERRORS = {  # name: (recipe, nodes, words the error must contain)
    "355b_6nodes": ("355b", 6, ["48 trainer GPUs are not divisible by TP 4 x PP 8 x CP 2 = 64"]),
    "355b_4nodes": ("355b", 4, ["does not fit", "H100 has 79.6 GiB"]),
}


def _hostfile(tmp_path: Path, nodes: int, slots: int = 8) -> str:
    f = tmp_path / "hostfile"
    f.write_text("# test cluster\n" + "".join(f"node{i} slots={slots}\n" for i in range(nodes)))
    return str(f)


def _commands(tmp_path, recipe, nodes, **extra):
    slots = 4 if extra.get("hardware") == "GB200" else 8
    opts = Options(num_nodes=nodes, hostfile=_hostfile(tmp_path, nodes, slots), **extra)
    return commands(RECIPES[recipe], opts, exists=lambda p: False)


def _check_snapshot(name: str, text: str, update: bool) -> None:
    path = SNAPSHOTS / f"launcher_{name}.txt"
    if update:  # pytest --update-snapshots
        path.write_text(text)
    assert path.exists(), f"no committed snapshot {path.name}: run pytest --update-snapshots and review it"
    assert text == path.read_text()


@pytest.mark.parametrize("name", sorted(CASES))
def test_commands_snapshot(name, tmp_path, update_snapshots):
    recipe, nodes, extra = CASES[name]
    cmds = _commands(tmp_path, recipe, nodes, **extra)
    _check_snapshot(name, "\n\n".join("\n".join(c) for c in cmds) + "\n", update_snapshots)


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_refused_node_counts_snapshot(name, tmp_path, update_snapshots):
    recipe, nodes, words = ERRORS[name]
    with pytest.raises(LaunchError) as e:
        _commands(tmp_path, recipe, nodes)
    for w in words:
        assert w in str(e.value)
    _check_snapshot(f"error_{name}", str(e.value) + "\n", update_snapshots)


@pytest.mark.parametrize("name", sorted(CASES))
def test_train_command_parses_through_run_config(name, tmp_path):
    recipe, nodes, extra = CASES[name]
    submit = _commands(tmp_path, recipe, nodes, **extra)[-1]
    args = submit[submit.index("train") + 1 :]
    rest, sglang = split_sglang_args(args)
    ns = vars(build_parser().parse_args(rest))  # argparse exits on any flag config.py does not know
    sections = {
        s: cls(**{k.split(".", 1)[1]: v for k, v in ns.items() if k.startswith(s + ".")}) for s, cls in SECTIONS.items()
    }
    t, r, m = sections["train"], sections["rollout"], sections["megatron"]
    assert t.backend == "megatron" and r.rollout_engine == "sglang" and ns["colocate"]
    assert t.num_trainer_ranks == nodes * (4 if extra.get("hardware") == "GB200" else 8)
    m.layout(t.num_trainer_ranks)  # the layout the megatron section derives is whole
    assert dict(sglang)["mem-fraction-static"] is not None
    assert sections["algo"].advantage_estimator == extra.get("algorithm", "gspo")
    if extra.get("enable_mtp"):
        assert r.enable_mtp and m.enable_mtp_training
    # RunConfig.validate() as a whole needs CUDA (--rollout-engine sglang) and the checkpoints on disk; its
    # Megatron-flag checks run here. KNOWN GAP: DeepEP is not installable on CPU, so its refusal is expected;
    # any other refusal fails.
    cfg = RunConfig(**sections, **{k: v for k, v in ns.items() if "." not in k})
    known_gaps = ("deep_ep package",)
    assert [e for e in cfg._check_backend() if not any(g in e for g in known_gaps)] == []


def test_existing_outputs_skip_their_step(tmp_path):
    opts = Options(num_nodes=8, hostfile=_hostfile(tmp_path, 8), rollout_fp8=True)
    every = commands(GLM45_355B, opts, exists=lambda p: False)
    done = commands(GLM45_355B, opts, exists=lambda p: True)
    assert [c[1] for c in every[:2]] == ["tools/convert_hf_to_fp8.py", "--nproc-per-node"]
    assert done == every[2:]


def test_dry_run_prints_every_command_and_errors_are_one_line(tmp_path):
    app = make_app(GLM45_AIR)
    hostfile = _hostfile(tmp_path, 4)
    result = CliRunner().invoke(
        app, ["--num-nodes", "4", "--hostfile", hostfile, "--dry-run", "--work-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    expected = commands(GLM45_AIR, Options(num_nodes=4, hostfile=hostfile, work_dir=str(tmp_path)))
    assert lines == [shlex.join(c) for c in expected]
    bad = CliRunner().invoke(app, ["--num-nodes", "4", "--dry-run"])
    assert bad.exit_code == 2 and "needs --hostfile" in bad.output


def test_p2p_air_example_plans_and_parses(tmp_path):
    """examples/p2p_weight_transfer/GLM-4.5-Air.sh under DRY_RUN=1: its `glm-rl plan` line fits (memory only:
    --skip-sync) and its `glm-rl train` line parses."""
    import os
    import subprocess

    from glm_rl.cli import app

    script = Path(__file__).parent.parent / "examples" / "p2p_weight_transfer" / "GLM-4.5-Air.sh"
    env = os.environ | {
        "DRY_RUN": "1",
        "HF_CHECKPOINT": "/m",
        "TORCH_DIST": "/t",
        "PROMPT_DATA": "/p",
        "WORK_DIR": str(tmp_path),
    }
    plan_line, submit_line = (
        subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, check=True)
        .stdout.strip()
        .splitlines()
    )
    plan = shlex.split(plan_line)
    result = CliRunner().invoke(app, plan[1:] + ["--skip-sync"])
    assert result.exit_code == 0, result.output
    assert "layers per stage [11, 12, 12, 11]" in result.output and "fits" in result.output
    submit = shlex.split(submit_line)
    rest, _ = split_sglang_args(submit[submit.index("train") + 1 :])
    ns = vars(build_parser().parse_args(rest))
    assert ns["sync.update_weight_transfer_mode"] == "p2p" and not ns["colocate"]
    assert ns["megatron.pipeline_model_parallel_size"] == 4 and ns["megatron.expert_model_parallel_size"] == 8
    missing = subprocess.run(["bash", str(script)], env={"PATH": os.environ["PATH"]}, capture_output=True, text=True)
    assert missing.returncode == 2 and "set HF_CHECKPOINT" in missing.stderr


def test_launcher_script_dry_run(tmp_path):
    """The script itself (a subprocess, as a user runs it) prints the same commands the snapshots hold."""
    import subprocess
    import sys

    script = Path(__file__).parent.parent / "launchers" / "run_glm45_355b_a32b.py"
    hostfile = _hostfile(tmp_path, 8)
    out = subprocess.run(
        [
            sys.executable,
            str(script),
            "--num-nodes",
            "8",
            "--hostfile",
            hostfile,
            "--enable-mtp",
            "--enable-mis",
            "--rollout-fp8",
            "--dry-run",
            "--work-dir",
            str(tmp_path / "w"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    expected = commands(
        GLM45_355B,
        Options(
            num_nodes=8,
            hostfile=hostfile,
            enable_mtp=True,
            enable_mis=True,
            rollout_fp8=True,
            work_dir=str(tmp_path / "w"),
        ),
    )
    assert out.stdout.strip().splitlines() == [shlex.join(c) for c in expected]
    assert expected[0][1] == "tools/convert_hf_to_fp8.py"  # nothing exists under the work dir yet
    bad = subprocess.run(
        [sys.executable, str(script), "--num-nodes", "6", "--hostfile", _hostfile(tmp_path, 6), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "not divisible by TP 4 x PP 8 x CP 2 = 64" in bad.stderr
