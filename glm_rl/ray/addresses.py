"""Where a process listens and how others reach it: the one place that decides addresses.

Every server of a run (trainer rendezvous, weight-sync group master, engines, router, P2P receivers) binds to
and advertises the IP address Ray reports for the node it runs on (`ray.util.get_node_ip_address()`). That is
the address the node was started with (`ray start --node-ip-address`), so a multi-NIC cluster picks the
network per node where it starts Ray, and a process on another node reaches it. Ray never reports loopback
(it maps 127.0.0.1 to the host's address), so a one-node run uses the host's own address, as Ray itself does.

torch.distributed's gloo backend does not take an address: each rank binds to the interface its hostname
resolves to, which is loopback on many hosts (Debian maps the hostname to 127.0.1.1), so a rank on another
node cannot connect. `bind_gloo_to` names the interface that carries the node's IP (`GLOO_SOCKET_IFNAME`,
gloo's own setting) unless the user has set one.
"""

from __future__ import annotations

import ipaddress
import os
import socket

LOOPBACK = "127.0.0.1"


def node_ip() -> str:
    """This process's node address as Ray knows it (loopback outside Ray)."""
    import ray

    if not ray.is_initialized():
        return LOOPBACK
    return ray.util.get_node_ip_address()


def free_port(host: str = LOOPBACK) -> int:
    """A port free on `host` now (bound, then released: the caller binds it next)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def host_for_url(host: str) -> str:
    """IPv6 literals go in brackets in URLs and `tcp://` init methods."""
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:  # a host name
        return host


def local_address_toward(remote: str) -> str:
    """The local address this host uses to reach `remote` (the routing table decides; no packet is sent)."""
    family = socket.AF_INET6 if ":" in remote else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((remote, 9))  # UDP connect only picks the route
        return s.getsockname()[0]


def interface_of(ip: str) -> str | None:
    """The network interface holding `ip`, or None (psutil reads the host's interface table)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)):
            return name
    return None


def bind_gloo_to(ip: str) -> None:
    """Make gloo ranks in this process listen on the interface of `ip` (kept if the user set one)."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    name = interface_of(ip)
    if name is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = name
