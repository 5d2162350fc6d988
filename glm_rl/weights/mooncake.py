"""Mooncake TransferEngine setup shared by both ends of P2P weight sync (`weights/p2p.py` on the trainer,
`engine/p2p_receiver.py` on the engine): one place that knows how this Mooncake version is started."""

from __future__ import annotations


def new_transfer_engine(host: str, protocol: str):
    """A Mooncake TransferEngine with peer-to-peer handshake (no metadata server) on `host`; its session id is
    f"{host}:{te.get_rpc_port()}". (`initialize_ext` / `allocate_managed_buffer` segfault in 0.3.13: unused.)"""
    from mooncake.engine import TransferEngine

    te = TransferEngine()
    if te.initialize(host, "P2PHANDSHAKE", protocol, "") != 0:
        raise RuntimeError(f"Mooncake TransferEngine.initialize({host!r}, {protocol!r}) failed")
    return te
