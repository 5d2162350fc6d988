"""glm_rl: RL post-training for the GLM-4.5 family of Mixture-of-Experts models."""

__version__ = "0.1.0"
