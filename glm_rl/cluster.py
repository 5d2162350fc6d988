"""What a cluster offers: GPU kinds (memory, link bandwidths, host memory) and MPI hostfiles.

`glm-rl plan` prices memory and weight sync against these numbers, and the launchers read the same hostfile
format as `mpirun` (`host slots=N`), so one file describes the cluster to both.

Numbers are vendor datasheet figures (NVIDIA DGX H100 / DGX H200 / DGX B200 and GB200 NVL72 datasheets) unless
the comment says otherwise. GPU memory is what the driver reports as total (nvidia-smi "MiB" / 1024), which is a
little below the marketing "GB". Bandwidths are per GPU and per direction, in bytes/s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GIB = 1 << 30
GB = 10**9


@dataclass(frozen=True)
class Hardware:
    name: str
    gpu_memory_gib: float  # usable HBM per GPU, as the driver reports it
    gpus_per_node: int  # GPUs behind one host (one Ray node)
    host_memory_gib: float  # CPU memory of one node (CPU Adam and offloaded weights live here)
    nic_bytes_s: float  # scale-out NIC per GPU (RDMA), one direction
    nvlink_bytes_s: float  # NVLink per GPU, one direction
    hbm_bytes_s: float  # device memory bandwidth (a local copy moves each byte twice)


# H100 SXM: 81559 MiB seen on this project's GPU box; DGX H100: 8 x ConnectX-7 400 Gb/s (one per GPU), NVLink 4
# 900 GB/s per GPU both directions, 2 TB host memory, HBM3 3.35 TB/s.
H100 = Hardware("H100", 81559 / 1024, 8, 2048, 400e9 / 8, 450 * GB, 3.35e12)
# H200 SXM: 141 GB HBM3e (143771 MiB in nvidia-smi), 4.8 TB/s; DGX H200: same NICs, NVLink and host memory as H100.
H200 = Hardware("H200", 143771 / 1024, 8, 2048, 400e9 / 8, 450 * GB, 4.8e12)
# B200: 183359 MiB in nvidia-smi (180 GB), ~7.7 TB/s; DGX B200: 8 x ConnectX-7 400 Gb/s, NVLink 5 1.8 TB/s per GPU
# both directions, 2 TB host memory (the base configuration).
B200 = Hardware("B200", 183359 / 1024, 8, 2048, 400e9 / 8, 900 * GB, 7.7e12)
# GB200 NVL72 compute tray: 4 GPUs and 2 Grace CPUs (2 x 480 GB LPDDR5X), 186 GB HBM3e per GPU (13.4 TB / 72;
# the driver figure is not checked here, so take 184 GiB), one 400 Gb/s ConnectX-7 per GPU, NVLink 5.
GB200 = Hardware("GB200", 184.0, 4, 2 * 480 * GB / GIB, 400e9 / 8, 900 * GB, 8e12)

HARDWARE = {h.name: h for h in (H100, H200, B200, GB200)}


def get_hardware(name: str) -> Hardware:
    if name not in HARDWARE:
        raise ValueError(f"unknown --hardware {name!r}; valid: {', '.join(HARDWARE)}")
    return HARDWARE[name]


@dataclass(frozen=True)
class Host:
    name: str
    slots: int  # GPUs on that host


def parse_hostfile(path: str | Path) -> list[Host]:
    """An MPI hostfile: one `host [slots=N]` per line; `#` starts a comment; blank lines are skipped. A line
    without `slots=` counts 1 slot, as Open MPI does. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--hostfile {path}: no such file")
    hosts: list[Host] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, *fields = line.split()
        slots = 1
        for f in fields:
            key, _, value = f.partition("=")
            if key not in ("slots", "max_slots") or not value.isdigit() or int(value) < 1:
                raise ValueError(f"{path}:{number}: expected `host slots=N` with N >= 1, got {raw.strip()!r}")
            if key == "slots":
                slots = int(value)
        if any(h.name == name for h in hosts):
            raise ValueError(f"{path}:{number}: host {name!r} is listed twice")
        hosts.append(Host(name, slots))
    if not hosts:
        raise ValueError(f"--hostfile {path}: no hosts (every line is blank or a comment)")
    return hosts


def uniform_slots(hosts: list[Host], path: str | Path = "hostfile") -> int:
    """GPUs per node when every host has the same count (Megatron layouts assume equal nodes)."""
    counts = {h.slots for h in hosts}
    if len(counts) != 1:
        raise ValueError(
            f"--hostfile {path}: hosts have different slot counts {sorted(counts)}; "
            "glm-rl needs the same number of GPUs on every node"
        )
    return counts.pop()
