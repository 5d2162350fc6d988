"""Weight transfer from trainer to engines: bucketing and transports (tensor, broadcast)."""
