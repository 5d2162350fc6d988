"""Two "hosts" on one machine for multi-node tests: two network namespaces joined by a veth pair, a Ray head in
the first and a Ray worker node in the second (token auth on, as on a real cluster), optionally an sshd in the
second. `tests/conftest.py`'s session fixture `two_node_cluster` yields a `TwoNodeCluster`.

Why namespaces: each has its own interfaces, routes, port space and loopback, so what a one-host test hides —
a rendezvous on 127.0.0.1, a port two nodes both pick, a library that binds to whatever the hostname resolves
to — fails here as on two machines. The filesystem and the PID space stay shared: one venv serves both, and a
`ray stop` run "in" a namespace would stop every Ray process on the machine (other people's too). So nothing
here runs `ray stop`: a namespace's processes are found with `ip netns pids` (only what we started lives there)
and signalled; deleting a namespace alone would leave them running.

Each namespace gets a default route over the veth: Ray takes as node address the source address a UDP
"connect" to 8.8.8.8 would use, and without a route falls back to 127.0.0.1. No packet leaves the pair (the
peer does not forward). Both veth ends are named `IFNAME` (a name is per namespace), which is what e.g.
`GLOO_SOCKET_IFNAME` needs: this machine's hostname resolves to 127.0.0.1, as Debian's 127.0.1.1 does.

Use, from a test taking the fixture (`c = two_node_cluster`):
    c.ns, c.ips, c.head_address      # ("glmrl-<pid>-a", "...-b"), ("10.77.N.1", "10.77.N.2"), "10.77.N.1:6379"
    c.python_in(0, CODE, *args)      # a driver "on host A": a bare `ray.init()` joins (c.env(): token, RAY_ADDRESS)
    c.exec_in(1, "bash line" or argv), c.popen_in(0, argv)   # anything else on either host, with c.env()
    c.kill_worker(); c.start_worker()   # node fault: B's Ray processes SIGKILLed until the head sees one node;
                                        # a test that kills it restarts it (the cluster is session-scoped)
    s = c.sshd(); c.exec_in(0, [*s.rsh, "--", s.host, "cmd"])   # ssh from A to B (sshd started on first use)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "glmrl-"  # namespaces are PREFIX<pid of the test session>-a / -b
IFNAME = "glm0"
RAY_PORT = 6379  # a fresh namespace has nothing listening: the default port is free
# Head-side health checks: a killed worker node is declared dead in ~3-5 s instead of ~15 s.
HEALTH_ENV = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}

_WAIT_NODES = """
import json, sys, time, ray
want, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
ray.init(logging_level="ERROR")
while True:
    ips = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
    if len(ips) == want or time.monotonic() > deadline:
        print(json.dumps(ips)); break
    time.sleep(0.3)
"""


class NetnsUnavailable(RuntimeError):
    """Network namespaces (or sshd) cannot be made here, the reason is the message: tests skip. Any later
    failure is a RuntimeError, which fails them."""


def unavailable_reason() -> str | None:
    """Why two namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    if shutil.which("ray") is None and not (Path(sys.executable).parent / "ray").exists():
        return "the `ray` CLI is not installed"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def ns_pids(ns: str) -> list[int]:
    """Processes whose network namespace is `ns` (empty once the namespace is gone)."""
    proc = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def kill_ns_processes(ns: str, sig: int = signal.SIGTERM, grace_s: float = 5.0, only: list[int] | None = None) -> None:
    """Signal every process in `ns` (or those of `only` that are in it), then SIGKILL what is left after grace_s."""

    def targets() -> list[int]:
        pids = ns_pids(ns)
        return [p for p in pids if only is None or p in only]

    for s, wait_s in ((sig, grace_s), (signal.SIGKILL, 10.0)):
        for pid in targets():
            try:
                os.kill(pid, s)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while targets() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not targets():
            return
    raise RuntimeError(f"processes in namespace {ns} survive SIGKILL: {targets()}")


def delete_namespace(ns: str, grace_s: float = 2.0) -> None:
    """Stop everything in `ns` (SIGTERM, SIGKILL after grace_s), then delete it (its veth end goes with it, and
    the peer end with that)."""
    if ns in list_namespaces():
        kill_ns_processes(ns, grace_s=grace_s)
        _ip("netns", "del", ns)


def list_namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def reap_stale() -> None:
    """Delete namespaces left by test sessions that died without their teardown (their pid is gone)."""
    for ns in list_namespaces():
        m = re.fullmatch(re.escape(PREFIX) + r"(\d+)-[ab]", ns)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            delete_namespace(ns)


def pick_subnet() -> str:
    """A 10.77.N prefix no address or route of this host, nor another session's namespaces, uses. The namespaces
    do not see the host's routes, but an overlap would confuse anyone reading `ip addr`, and Ray's own checks
    scan every process on the machine for a GCS at the same address."""
    used = _ip("-4", "addr").stdout + _ip("-4", "route").stdout
    for ns in list_namespaces():
        used += _ip("-n", ns, "-4", "addr", check=False).stdout if ns.startswith(PREFIX) else ""
    start = os.getpid() % 250
    for i in range(250):
        n = (start + i) % 250 + 1
        if not re.search(rf"(?<![\d.])10\.77\.{n}\.", used):
            return f"10.77.{n}"
    raise RuntimeError("every 10.77.N.0/24 is in use on this host")


def ray_bin() -> str:
    local = Path(sys.executable).parent / "ray"
    return str(local) if local.exists() else shutil.which("ray") or "ray"


@dataclass
class Sshd:
    """An sshd in a namespace; `rsh` is the client argv (run it in the other namespace) up to the host."""

    host: str
    port: int
    rsh: list[str]
    proc: subprocess.Popen


class TwoNodeCluster:
    """Namespaces `ns[0]` (Ray head, `ips[0]`) and `ns[1]` (Ray worker, `ips[1]`); see the module docstring."""

    def __init__(self, num_cpus: int = 2) -> None:
        pid = os.getpid()
        self.ns = (f"{PREFIX}{pid}-a", f"{PREFIX}{pid}-b")
        self.num_cpus = num_cpus
        self.root = Path(tempfile.mkdtemp(prefix="glmrl", dir="/tmp"))  # short: Ray's socket paths <= 107 bytes
        self.token_path = self.root / "auth_token"
        self.token_path.write_text(os.urandom(32).hex())
        self.token_path.chmod(0o600)
        self.ips: tuple[str, str] = ("", "")
        self._sshd: Sshd | None = None

    # -- addresses and environment -------------------------------------------------------------------------
    @property
    def head_address(self) -> str:
        return f"{self.ips[0]}:{RAY_PORT}"

    @property
    def ifname(self) -> str:
        return IFNAME

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a Ray CLI call or a driver in either namespace: token auth with this session's token,
        RAY_ADDRESS = the head (so a bare `ray.init()` joins it)."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path), RAY_ADDRESS=self.head_address)
        return env | extra

    def _ns_of(self, ns: str | int) -> str:
        return self.ns[ns] if isinstance(ns, int) else ns

    def exec_in(
        self,
        ns: str | int,
        cmd: list[str] | str,
        *,
        check: bool = False,
        timeout: float = 120,
        env: dict | None = None,
        **kw,
    ) -> subprocess.CompletedProcess:
        """Run `cmd` (argv, or a bash line) "on host" ns (a name, or 0 / 1), with `self.env()`; output captured."""
        argv = ["bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return subprocess.run(
            ["ip", "netns", "exec", self._ns_of(ns), *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            env=env or self.env(),
            **kw,
        )

    def popen_in(self, ns: str | int, argv: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self._ns_of(ns), *argv], env=env or self.env(), **kw)

    def python_in(self, ns: str | int, code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.exec_in(ns, [sys.executable, "-c", code, *args], timeout=timeout)

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self, timeout_s: float = 90) -> TwoNodeCluster:
        reap_stale()
        net = pick_subnet()
        self.ips = (f"{net}.1", f"{net}.2")
        a, b = self.ns
        try:
            _ip("netns", "add", a)
        except RuntimeError as e:  # e.g. root in a container without CAP_SYS_ADMIN
            raise NetnsUnavailable(str(e)) from None
        _ip("netns", "add", b)
        _ip("link", "add", IFNAME, "netns", a, "type", "veth", "peer", "name", IFNAME, "netns", b)
        for ns, ip in zip(self.ns, self.ips):
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", IFNAME)
            for dev in ("lo", IFNAME):
                _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "route", "add", "default", "dev", IFNAME)
        self._ray_start(0, ["--head", "--port", str(RAY_PORT), "--include-dashboard", "false"], HEALTH_ENV)
        self.start_worker(timeout_s)
        return self

    def _ray_start(self, i: int, args: list[str], extra_env: dict | None = None) -> None:
        argv = [
            ray_bin(),
            "start",
            "--node-ip-address",
            self.ips[i],
            "--num-cpus",
            str(self.num_cpus),
            "--num-gpus",
            "0",
            "--object-store-memory",
            str(100 * 2**20),
            "--disable-usage-stats",
            "--temp-dir",
            str(self.root / f"ray{i}"),
            *args,
        ]
        proc = self.exec_in(i, argv, env=self.env(**(extra_env or {})), timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start in {self.ns[i]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")

    def start_worker(self, timeout_s: float = 60) -> None:
        """(Re)start the worker node in ns[1] and wait until the head sees both nodes."""
        self._ray_start(1, ["--address", self.head_address])
        self.wait_for_nodes(2, timeout_s)

    def alive_node_ips(self, want: int, timeout_s: float = 60) -> list[str]:
        """The alive nodes' IPs as the head sees them, polled (by a driver in ns[0]) until there are `want`."""
        proc = self.python_in(0, _WAIT_NODES, str(want), str(timeout_s), timeout=timeout_s + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"cannot list Ray nodes: {proc.stderr[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def wait_for_nodes(self, want: int, timeout_s: float = 60) -> list[str]:
        ips = self.alive_node_ips(want, timeout_s)
        if len(ips) != want:
            raise RuntimeError(f"expected {want} alive Ray nodes within {timeout_s:.0f} s, the head sees {ips}")
        return ips

    def kill_worker(self, sig: int = signal.SIGKILL, timeout_s: float = 30) -> None:
        """Node fault: signal every Ray process in ns[1] (default SIGKILL, as a lost host), wait until the head
        has marked that node dead. The sshd, if started, lives on. `start_worker()` brings the node back."""
        keep = {self._sshd.proc.pid} if self._sshd else set()
        ray_pids = [p for p in ns_pids(self.ns[1]) if p not in keep and not _is_sshd(p)]
        kill_ns_processes(self.ns[1], sig, only=ray_pids)
        self.wait_for_nodes(1, timeout_s)

    def sshd(self) -> Sshd:
        """An sshd in ns[1] on ips[1]:22 (own host key, a session key for root), started on first use; run
        `Sshd.rsh + [host, command]` in ns[0]."""
        if self._sshd is None:
            self._sshd = _start_sshd(self.root / "ssh", self.ns, self.ips[1])
        return self._sshd

    def close(self) -> None:
        """Stop everything in both namespaces, delete them, remove the temp dir; raise if anything survived."""
        errors = []
        for ns in reversed(self.ns):
            try:
                delete_namespace(ns)
            except RuntimeError as e:
                errors.append(str(e))
        if self._sshd is not None:  # killed with its namespace; reap it
            if self._sshd.proc.poll() is None:
                self._sshd.proc.kill()
            self._sshd.proc.wait(timeout=10)
        left = [ns for ns in self.ns if ns in list_namespaces()]
        shutil.rmtree(self.root, ignore_errors=True)
        if errors or left:
            raise RuntimeError(f"two-node cluster teardown: {errors} namespaces left: {left}")


def _is_sshd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().startswith("sshd")  # sshd, sshd-session
    except OSError:
        return False


def write_sshd_files(root: Path, port: int, hosts: list[str]) -> None:
    """A throwaway sshd's files under `root`: host and user keys (ed25519), authorized_keys, and an sshd_config
    listening on `hosts`:`port` with key-only root login (also used by the bash launcher's loopback test)."""
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True)
    shutil.copy(root / "user_key.pub", root / "authorized_keys")
    lines = [
        f"Port {port}",
        *(f"ListenAddress {h}" for h in hosts),
        f"HostKey {root / 'host_key'}",
        f"AuthorizedKeysFile {root / 'authorized_keys'}",
        f"PidFile {root / 'sshd.pid'}",
        "StrictModes no",
        "UsePAM no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password",
        "LogLevel ERROR",
    ]
    (root / "sshd_config").write_text("\n".join(lines) + "\n")


def _start_sshd(root: Path, ns: tuple[str, str], host: str, port: int = 22) -> Sshd:
    sshd, ssh = shutil.which("sshd") or "/usr/sbin/sshd", shutil.which("ssh")
    if not (Path(sshd).exists() and ssh):
        raise NetnsUnavailable("needs OpenSSH (openssh-server, openssh-client)")
    root.mkdir(parents=True, exist_ok=True)
    write_sshd_files(root, port, [host])
    os.makedirs("/run/sshd", exist_ok=True)  # privilege-separation directory
    with open(root / "sshd.log", "w") as log:  # sshd keeps its own copy of the descriptor
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns[1], sshd, "-D", "-e", "-f", str(root / "sshd_config")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    rsh = [
        ssh,
        "-p",
        str(port),
        "-i",
        str(root / "user_key"),
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=5",
    ]
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {(root / 'sshd.log').read_text()[-500:]}")
        probe = subprocess.run(["ip", "netns", "exec", ns[0], *rsh, "--", host, "true"], capture_output=True)
        if probe.returncode == 0:
            return Sshd(host, port, rsh, proc)
        if time.monotonic() > deadline:
            raise RuntimeError(f"sshd runs but ssh to it fails: {probe.stderr[-500:]!r}")
        time.sleep(0.3)
