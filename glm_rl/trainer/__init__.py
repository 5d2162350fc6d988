"""Trainer: Ray actor group, batching / DP split, backends (torch; megatron later), routing replay."""
