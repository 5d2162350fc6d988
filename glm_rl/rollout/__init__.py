"""Rollout: prompt data, rewards, engines and the rollout manager."""
