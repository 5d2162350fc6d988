"""A two-node Ray cluster on one machine (network namespaces, tests/netns.py): Ray places work on both "hosts"
and each reports its own address, a gloo process group spans them, loopback does not, ssh reaches the second
host, and a killed worker node is seen dead and comes back. One session-scoped cluster serves every test;
drivers run inside the head's namespace, as `glm-rl train` would on the head node."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from netns import NetnsUnavailable

# One actor per node (STRICT_SPREAD), each reporting the address Ray gives its node.
SPREAD = """
import json, ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
ray.init(logging_level="ERROR")
pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
ray.get(pg.ready(), timeout=60)

@ray.remote(num_cpus=1)
class Where:
    def ip(self):
        return ray.util.get_node_ip_address()

actors = [Where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
          .remote() for i in range(2)]
print(json.dumps({"driver": ray.util.get_node_ip_address(), "actors": ray.get([a.ip.remote() for a in actors])}))
"""

# Rank 0 (pinned to the head node) picks its own address and a free port; rank 1 (the worker node) joins it.
GLOO = """
import json, sys, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ifname = sys.argv[1]
ray.init(logging_level="ERROR")
head = ray.get_runtime_context().get_node_id()
other = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head)

@ray.remote(num_cpus=1)
class Rank:
    def endpoint(self):
        import socket
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def all_reduce(self, rank, addr, port):
        import os
        import torch
        import torch.distributed as dist
        os.environ["GLOO_SOCKET_IFNAME"] = ifname  # the hostname resolves to 127.0.0.1 here
        dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=2)
        x = torch.arange(4, dtype=torch.float32) * (rank + 1)
        dist.all_reduce(x)
        dist.destroy_process_group()
        return ray.util.get_node_ip_address(), x.tolist()

ranks = [Rank.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote()
         for n in (head, other)]
addr, port = ray.get(ranks[0].endpoint.remote())
print(json.dumps(ray.get([r.all_reduce.remote(i, addr, port) for i, r in enumerate(ranks)], timeout=120)))
"""

LISTEN = """
import socket, sys
port = int(sys.argv[1])
socks = []
for host in sys.argv[2:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen()
    socks.append(s)
print("ready", flush=True)
sys.stdin.read()  # until the test closes stdin
"""

CONNECT = """
import json, socket, sys
port, out = int(sys.argv[1]), {}
for host in sys.argv[2:]:
    try:
        socket.create_connection((host, port), timeout=5).close()
        out[host] = "connected"
    except OSError as e:
        out[host] = type(e).__name__
print(json.dumps(out))
"""


def _json(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_one_actor_per_node_reports_its_node_address(two_node_cluster):
    c = two_node_cluster
    out = _json(c.python_in(0, SPREAD))
    assert out["driver"] == c.ips[0]
    assert sorted(out["actors"]) == sorted(c.ips)


def test_gloo_all_reduce_across_the_two_nodes(two_node_cluster):
    c = two_node_cluster
    (ip0, x0), (ip1, x1) = _json(c.python_in(0, GLOO, c.ifname, timeout=180))
    assert (ip0, ip1) == c.ips
    assert x0 == x1 == [0.0, 3.0, 6.0, 9.0]  # (1 + 2) * arange(4)


def test_loopback_of_one_host_is_not_reachable_from_the_other(two_node_cluster):
    """Control: without it, a test passing here could be talking over one shared loopback."""
    c = two_node_cluster
    port = "47123"
    listener = c.popen_in(
        0,
        [sys.executable, "-c", LISTEN, port, "127.0.0.1", c.ips[0]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stdout.readline().strip() == "ready"
        same_host = _json(c.python_in(0, CONNECT, port, "127.0.0.1", c.ips[0]))
        other_host = _json(c.python_in(1, CONNECT, port, "127.0.0.1", c.ips[0]))
    finally:
        listener.stdin.close()
        listener.wait(timeout=10)
    assert same_host == {"127.0.0.1": "connected", c.ips[0]: "connected"}
    assert other_host == {"127.0.0.1": "ConnectionRefusedError", c.ips[0]: "connected"}


def test_ssh_from_the_head_reaches_the_second_host(two_node_cluster):
    c = two_node_cluster
    try:
        sshd = c.sshd()
    except NetnsUnavailable as e:
        pytest.skip(str(e))
    proc = c.exec_in(0, [*sshd.rsh, "--", sshd.host, f"ip -4 -o addr show dev {c.ifname}"], timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert f"inet {c.ips[1]}/24" in proc.stdout


def test_killed_worker_node_is_seen_dead_and_restarts(two_node_cluster):
    """kill_worker() is the node fault later tests use; the cluster is whole again afterwards (session-scoped)."""
    c = two_node_cluster
    c.kill_worker()
    assert c.alive_node_ips(1, timeout_s=1) == [c.ips[0]]
    c.start_worker()
    assert c.alive_node_ips(2, timeout_s=1) == sorted(c.ips)
