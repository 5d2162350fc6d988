"""Training recipes beyond RL (issue 9): pretrain with MTP, full SFT, LoRA / DoRA on the Megatron GLM-4.5.

- `schema`: the typed recipe config (`RecipeConfig` and its sections).
- `presets`: the named recipe functions (`glm45_355b_pretrain_config`, ... and `tiny` twins), `get_recipe`.
- `config`: dotted `key=value` overrides and validation (re-exports the names callers use).
- `planning`: a recipe's layout and per-GPU memory through `glm-rl plan`'s trainer checks.
- `data`: pretraining text and SFT chats, tokenised and packed (assistant-only loss for SFT).
- `peft`: LoRA / DoRA wrappers for Megatron's tensor-parallel linears, merge for export.
- `runner`: the training loop behind `glm-rl recipe` (single process or torchrun).
"""
