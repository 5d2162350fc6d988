"""Everything GLM-4.5: presets, checkpoint loading, HF tensor-name rules."""
