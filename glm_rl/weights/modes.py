"""`make_transport`: the WeightTransport of each `--update-weight-transfer-mode` (tensor, broadcast, p2p).

Why a module of its own: the choice needs every transport, and `p2p.py` builds on `transports.py`; picking here
keeps those two free of each other's imports.
"""

from __future__ import annotations

from glm_rl.weights.p2p import P2PTransport
from glm_rl.weights.transports import BroadcastTransport, TensorTransport, WeightTransport


def make_transport(
    mode: str,
    engine_urls: list[str],
    api_key: str | None,
    bucket_bytes: int,
    fp8: bool = False,
    group_backend: str = "gloo",
) -> WeightTransport:
    """`group_backend`: the broadcast group's (gloo / nccl; see `weights/group.py`)."""
    match mode:
        case "tensor":
            return TensorTransport(engine_urls, api_key, bucket_bytes, fp8=fp8)
        case "broadcast":
            transport = BroadcastTransport(engine_urls, api_key, bucket_bytes, fp8=fp8)
            transport.backend = group_backend
            return transport
        case "p2p":  # every trainer rank is a source: call it on every rank (TrainerGroup does)
            if fp8:
                raise ValueError("--rollout-fp8 is not supported with --update-weight-transfer-mode p2p yet")
            return P2PTransport.for_this_rank(engine_urls, api_key, bucket_bytes)
        case _:
            raise ValueError(f"unknown --update-weight-transfer-mode {mode!r}; valid: tensor, broadcast, p2p")
