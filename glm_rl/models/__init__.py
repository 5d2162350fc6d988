"""GLM-4.5 family: presets (architecture numbers) and HF checkpoint loading."""

from glm_rl.models.glm45.presets import PRESETS, ModelSpec, get_preset

__all__ = ["PRESETS", "ModelSpec", "get_preset"]
