"""The torch.distributed group behind `update_weights_from_distributed`: the trainer's source rank and the engines.

Why its own group: the trainer (rank 0, the source) and every engine (rank = rank_offset) build it with this same
function — a TCPStore + `ProcessGroupGloo` — so it never touches the default process group, and a trainer that
already runs torch.distributed can build it beside its own.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from glm_rl.ray.addresses import local_address_toward


@dataclass
class WeightGroup:
    """One rank's handle on a weights-update group (rank 0 is the source)."""

    name: str
    rank: int
    world_size: int
    store: Any
    pg: Any

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Broadcast `tensor` from `src` in place (contiguous CPU tensors); returns it."""
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
    timeout_s: float = 600.0,
) -> WeightGroup:
    """Join (rank 0: host) the group `group_name`; blocks until all `world_size` ranks have joined.

    Rank 0 hosts the TCPStore at master_address:master_port. The default process group is never used, so a
    trainer that already runs torch.distributed can build this beside it.
    """
    if backend != "gloo":
        raise ValueError(f"create_weight_group: backend {backend!r} unsupported (gloo only)")
    if not 0 <= rank < world_size:
        raise ValueError(f"create_weight_group: rank {rank} outside world_size {world_size}")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        master_address, int(master_port), world_size, is_master=(rank == 0), timeout=timeout, wait_for_workers=False
    )
    prefixed = dist.PrefixStore(f"glm_rl_weights/{group_name}", store)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    # gloo's default device binds to what the hostname resolves to (often loopback): bind to the address that
    # reaches the master instead, so ranks on other nodes can connect back
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_address_toward(master_address))]
    pg = dist.ProcessGroupGloo(prefixed, rank, world_size, opts)
    return WeightGroup(group_name, rank, world_size, store, pg)
