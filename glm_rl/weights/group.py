"""The torch.distributed group behind `update_weights_from_distributed`: the trainer's source rank and the engines.

Why its own group: the trainer (rank 0, the source) and every engine (rank = rank_offset) build it with this same
function — a TCPStore + a gloo or NCCL process group — so it never touches the default process group, and a
trainer that already runs torch.distributed can build it beside its own.

Backends: `gloo` moves CPU tensors over sockets (CPU runs, and engines that share the trainer's GPU: NCCL refuses
two ranks on one device); `nccl` moves CUDA tensors GPU to GPU (NVLink / InfiniBand) — what SGLang's
`init_weights_update_group(backend="nccl")` builds on its side, and the only sane way to move 706 GB of 355B
weights between nodes.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from glm_rl.ray.addresses import local_address_toward

BACKENDS = ("gloo", "nccl")


@dataclass
class WeightGroup:
    """One rank's handle on a weights-update group (rank 0 is the source)."""

    name: str
    rank: int
    world_size: int
    store: Any
    pg: Any
    backend: str = "gloo"
    device: torch.device = torch.device("cpu")  # where this rank's broadcast tensors live (a GPU for NCCL)

    def close(self) -> None:
        """NCCL: abort the communicator now (an operation stuck on a dead peer ends, and NCCL's watchdog does not
        take the process down later); a gloo group is left to its timeout (`liveness.abandon`)."""
        if self.backend == "nccl":
            self.pg.abort()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Broadcast `tensor` from `src` in place (contiguous, on `device`); returns it."""
        if not tensor.is_contiguous():
            raise ValueError(f"group {self.name!r}: broadcast needs a contiguous tensor")
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = src, 0
        self.pg.broadcast([tensor], opts).wait()
        return tensor


def create_weight_group(
    master_address: str,
    master_port: int,
    *,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str = "gloo",
    device: torch.device | str | None = None,
    timeout_s: float = 600.0,
) -> WeightGroup:
    """Join (rank 0: host) the group `group_name`; blocks until all `world_size` ranks have joined. `device`
    (NCCL): this rank's GPU, default the current one.

    Rank 0 hosts the TCPStore at master_address:master_port. The default process group is never used, so a
    trainer that already runs torch.distributed can build this beside it.
    """
    if backend not in BACKENDS:
        raise ValueError(f"create_weight_group: backend {backend!r} unsupported; valid: {', '.join(BACKENDS)}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("create_weight_group: backend 'nccl' needs a CUDA device in this process")
    if not 0 <= rank < world_size:
        raise ValueError(f"create_weight_group: rank {rank} outside world_size {world_size}")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        master_address, int(master_port), world_size, is_master=(rank == 0), timeout=timeout, wait_for_workers=False
    )
    prefixed = dist.PrefixStore(f"glm_rl_weights/{group_name}", store)
    if backend == "nccl":
        gpu = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        nccl_opts = dist.ProcessGroupNCCL.Options()
        nccl_opts._timeout = timeout
        with torch.cuda.device(gpu):
            pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, nccl_opts)
        # connect now, so the join (not the first broadcast) is what waits for every rank and times out
        pg.eager_connect_single_device(gpu)
        return WeightGroup(group_name, rank, world_size, store, pg, backend, gpu)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    # gloo's default device binds to what the hostname resolves to (often loopback): bind to the address that
    # reaches the master instead, so ranks on other nodes can connect back
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_address_toward(master_address))]
    pg = dist.ProcessGroupGloo(prefixed, rank, world_size, opts)
    return WeightGroup(group_name, rank, world_size, store, pg)
