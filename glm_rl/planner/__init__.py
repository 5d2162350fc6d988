"""`glm-rl plan`: parallel layout, per-GPU memory and predicted weight-sync time."""
