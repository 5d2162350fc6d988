"""Trainer backends. `torch`: HF Glm4MoeForCausalLM, data parallel (the numerical reference)."""
