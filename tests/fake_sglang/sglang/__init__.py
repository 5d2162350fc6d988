"""A stand-in `sglang` package for tests: SGLang cannot run on these CPU machines (CUDA-only wheels)."""
