"""Hosts and the commands that run on them, for the Typer launchers (`glm_rl/launch.py`): hostfile name checks,
the remote-shell and Ray command builders (`ray start` head / workers, `ray job submit`), and the Ray auth token.

Why its own module: everything that decides what reaches ssh or a remote shell lives here, in one place to
review. Every remote command is `REMOTE_SHELL -- HOST WORDS...`, every word quoted, and host names are checked
(`HOST_RE`) before anything runs: a name cannot reach ssh as an option nor a shell as syntax. Ray runs with token
auth by default: local commands carry `RAY_AUTH_MODE`, and each remote `ray start` reads the launcher's token from
stdin (never from a command line, which `ps` and `--dry-run` show). launchers/lib/common.sh does the same.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

from glm_rl.cluster import Host

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
