"""Weight transfer from trainer to engines, both ends' shared parts.

- `wire`: payload formats (serialize / deserialize side by side), dtype names, checksums, `WeightError`.
- `group`: the gloo group of `update_weights_from_distributed`; `mooncake`: the P2P TransferEngine setup.
- `flat`: a module's weights as views into one buffer; `bucketing`: size-bounded buckets.
- `transports` (tensor, broadcast), `p2p` (Mooncake, every trainer rank a source, planned by `transfer_plan`);
  `modes.make_transport` picks one per `--update-weight-transfer-mode`.
"""
