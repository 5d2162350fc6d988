"""Megatron trainer backend (issue 4, first slice): GLM-4.5 on megatron-core 0.19.2 from a `ModelSpec`.

- `cpu_shims`: the few CPU/gloo patches megatron-core needs, applied only by `apply_cpu_shims()`.
- `model`: `TransformerConfig` / `GPTModel` for GLM-4.5 (local spec), and `setup_model_parallel`.
- `bridge`: one HF ↔ Megatron weight table, used by `import_hf_weights` and `export_hf_weights`.
- `cp_attention`: context-parallel core attention for the local spec, and the CP sequence split.

Nothing here imports megatron at package import time.
"""
