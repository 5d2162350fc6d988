"""Both launchers (bash: launchers/lib/common.sh; Typer: glm_rl/launch.py) against hostile hostfiles and host
names, and their Ray token auth.

- A hostfile line whose host is not a host name or an IP address is refused, naming the line, before anything
  runs (no remote-shell call, no marker file).
- A name that got past that check still could not reach ssh as an option (`--` comes before the host) nor a
  shell as syntax (every word is quoted): checked by running the generated remote command for real against a
  stand-in host, with the hostfile check bypassed.
- Every remote `ray start` runs with RAY_AUTH_MODE=token and the launcher's token, which travels on stdin, never
  on a command line.

The stand-in host (FAKE_SSH) reads its options as ssh does — `-oProxyCommand=CMD` runs CMD, which is how a host
name starting with `-` executes code — then runs the words after the host under `sh -c` with its stdin, as
sshd does; the `ray` on its PATH only records its arguments and Ray's auth variables. Nothing is started.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from glm_rl import launch
from glm_rl.cluster import Host
from glm_rl.launch import GLM45_AIR, LaunchError, Options, make_app, ray_commands

REPO = Path(__file__).resolve().parent.parent
RTINY = REPO / "launchers" / "run-glm4.5-tiny-cpu.sh"
TOKEN = "ab" * 32

FAKE_SSH = """
import subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("-"):
    opt = args.pop(0)
    if opt == "--":
        break
    if opt.startswith("-oProxyCommand="):
        subprocess.run(opt.split("=", 1)[1], shell=True)
host, words = args[0], args[1:]
sys.exit(subprocess.run(["sh", "-c", " ".join(words)]).returncode)
"""

# hostfile text ({M}: the marker file a successful injection creates), the line the error must name
HOSTILE = [
    ("-oProxyCommand=touch${IFS}{M} slots=1\n", 1),
    ("head slots=1\n-oProxyCommand=touch${IFS}{M} slots=1\n", 2),
    ("head slots=1\na;touch${IFS}{M} slots=1\n", 2),
    ("head slots=1\n$(touch${IFS}{M}) slots=1\n", 2),
    ("# the head\nhead slots=1\n`touch${IFS}{M}` slots=1\n", 3),
    ("a|b slots=1\nhead slots=1\n", 1),
    ("head slots=1\nhost name slots=1\n", 2),
]


@pytest.fixture
def fake_host(tmp_path):
    """(fake ssh, the file its `ray` records to, env with the fake `ray` first on PATH, marker path)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ssh, ray, record = bin_dir / "fake-ssh", bin_dir / "ray", tmp_path / "ray_record"
    ssh.write_text(f"#!{sys.executable}\n{FAKE_SSH}")
    ray.write_text(
        '#!/bin/sh\n{ printf "%s\\n" "$@"; echo "RAY_AUTH_MODE=$RAY_AUTH_MODE"; '
        f'echo "RAY_AUTH_TOKEN=$RAY_AUTH_TOKEN"; }} > {shlex.quote(str(record))}\n'
    )
    ssh.chmod(0o755)
    ray.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return ssh, record, env, tmp_path / "pwned"


def _hostfile(tmp_path: Path, text: str, marker: Path) -> Path:
    f = tmp_path / "hostfile"
    f.write_text(text.replace("{M}", str(marker)))
    return f


# -- hostile hostfiles are refused before anything runs -----------------------------------------------------
@pytest.mark.parametrize("text, line", HOSTILE)
def test_bash_launcher_refuses_hostile_hostfile_lines(tmp_path, fake_host, text, line):
    ssh, _, env, marker = fake_host
    calls = tmp_path / "rsh_calls"
    rsh = tmp_path / "rsh"
    rsh.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(calls))}\nexec {shlex.quote(str(ssh))} "$@"\n')
    rsh.chmod(0o755)
    (tmp_path / "token").write_text(TOKEN)
    hostfile = _hostfile(tmp_path, text, marker)
    env |= {"GLM_RL_RSH": str(rsh), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}
    proc = subprocess.run(
        ["bash", str(RTINY), "--hostfile", str(hostfile)], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 2, proc.stderr
    assert f"error: hostfile {hostfile}:{line}: " in proc.stderr
    assert not calls.exists() and not marker.exists()


@pytest.mark.parametrize("text, line", HOSTILE)
def test_typer_launcher_refuses_hostile_hostfile_lines(tmp_path, fake_host, monkeypatch, text, line):
    ssh, _, _, marker = fake_host
    calls = []
    monkeypatch.setattr(launch.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.setattr(launch, "wait_for_nodes", lambda *a, **kw: calls.append("wait"))
    hostfile = _hostfile(tmp_path, text, marker)
    result = CliRunner().invoke(
        make_app(GLM45_AIR),
        ["--num-nodes", "2", "--hostfile", str(hostfile), "--remote-shell", str(ssh), "--work-dir", str(tmp_path)],
    )
    assert result.exit_code == 2, result.output
    assert f"{hostfile}:{line}: " in result.output
    assert calls == [] and not marker.exists()


# -- a name past the check still cannot inject: `--` and quoting ------------------------------------------------
HEAD = "h$(touch${IFS}{M})"  # ran by any shell that sees it unquoted
WORKER = "-oProxyCommand=touch${IFS}{M}"  # ran by ssh if it reads it as an option


def _expect_record(record: Path, head: str) -> None:
    lines = record.read_text().splitlines()
    address = lines[lines.index("--address") + 1]
    assert address == f"{head}:6379"  # arrived as one literal word
    assert lines[-2:] == ["RAY_AUTH_MODE=token", f"RAY_AUTH_TOKEN={TOKEN}"]


def test_typer_remote_command_quotes_names_and_carries_the_token(fake_host):
    ssh, record, env, marker = fake_host
    head, worker = HEAD.replace("{M}", str(marker)), WORKER.replace("{M}", str(marker))
    cmds = ray_commands([Host(head, 8), Host(worker, 8)], 8, remote_shell=str(ssh))
    assert cmds[0][:3] == ["env", "RAY_AUTH_MODE=token", "ray"]
    assert cmds[1][:3] == [str(ssh), "--", worker] and TOKEN not in " ".join(cmds[1])
    proc = subprocess.run(cmds[1], input=f"{TOKEN}\n", env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    _expect_record(record, head)


def test_bash_remote_command_quotes_names_and_carries_the_token(fake_host):
    """glm_start_node for a worker whose head and own name are hostile (the hostfile check bypassed)."""
    ssh, record, env, marker = fake_host
    head, worker = HEAD.replace("{M}", str(marker)), WORKER.replace("{M}", str(marker))
    harness = f"""
source {shlex.quote(str(REPO / "launchers" / "lib" / "common.sh"))}
set -euo pipefail
RSH=({shlex.quote(str(ssh))}); DRY_RUN=0; CPU_MODE=1; REMOTE_SETUP=""; RAY_TEMP_DIR=/nonexistent; RAY_PORT=6379
NODE_PORT_BASE=""; RAY_START_EXTRA=(); RAY_AUTH_MODE=token; GLM_AUTH_TOKEN="$TOKEN"
GLM_HOSTS=("$HEAD" "$WORKER"); GLM_SLOTS=(1 1)
glm_start_node 1
"""
    proc = subprocess.run(
        ["bash", "-c", harness],
        capture_output=True,
        text=True,
        timeout=30,
        env={**env, "HEAD": head, "WORKER": worker, "TOKEN": TOKEN},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not marker.exists()
    _expect_record(record, head)


# -- Typer: the token goes to remote commands only, on stdin ------------------------------------------------
def test_typer_run_sends_the_token_on_stdin_to_remote_commands_only(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(launch.subprocess, "run", lambda cmd, **kw: calls.append((cmd, kw.get("input"))))
    monkeypatch.setattr(launch, "wait_for_nodes", lambda *a, **kw: None)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # run() sets it for its own ray.init; restored afterwards
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    (tmp_path / "token").write_text(TOKEN + "\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    hostfile = tmp_path / "hosts"
    hostfile.write_text("".join(f"node{i} slots=8\n" for i in range(4)))
    opts = Options(num_nodes=4, hostfile=str(hostfile), work_dir=str(tmp_path))
    launch.run(GLM45_AIR, opts)
    remote = [(c, i) for c, i in calls if c[:2] == ["ssh", "--"]]
    assert [c[2] for c, _ in remote] == ["node1", "node2", "node3"]
    assert all(i == f"{TOKEN}\n" for _, i in remote)
    assert all(i is None for c, i in calls if c[:2] != ["ssh", "--"])
    assert not any(TOKEN in " ".join(c) for c, _ in calls)  # never on a command line
    assert [c[:5] for c, _ in calls][-1] == ["env", "RAY_AUTH_MODE=token", "ray", "job", "submit"]

    calls.clear()
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(LaunchError, match="RAY_AUTH_MODE=token but no token at .*missing"):
        launch.run(GLM45_AIR, opts)
    assert calls == []  # refused before the first command


def test_typer_auth_disabled_sends_no_token(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node0 slots=8\nnode1 slots=8\nnode2 slots=8\nnode3 slots=8\n")
    cmds = launch.commands(
        GLM45_AIR, Options(num_nodes=4, hostfile=str(hostfile), ray_auth_mode="disabled"), exists=lambda p: True
    )
    assert cmds[0][:2] == ["env", "RAY_AUTH_MODE=disabled"] and cmds[-1][:2] == ["env", "RAY_AUTH_MODE=disabled"]
    assert cmds[1][3:5] == ["export RAY_AUTH_MODE=disabled;", "ray"]
    with pytest.raises(LaunchError, match="expected token or disabled"):
        launch.commands(GLM45_AIR, Options(num_nodes=4, hostfile=str(hostfile), ray_auth_mode="tokne"))
