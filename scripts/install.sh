#!/usr/bin/env bash
# Install glm_rl and everything it needs on a fresh machine (CPU by default).
#  1. torch first, pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
#  2. megatron-core 0.19.2 without its Requires-Python check (it declares >=3.12 but runs on 3.11: see README).
#  3. the package itself, editable, with the test and P2P extras and what megatron-core imports (triton, einops).
# GLM_RL_TORCH overrides the torch requirement (e.g. on a GPU machine with its own torch: GLM_RL_TORCH=skip).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip"
TORCH="${GLM_RL_TORCH:-torch==2.13.0}"
if [ "$TORCH" != "skip" ]; then $PIP install -q "$TORCH"; fi
$PIP install -q numpy "packaging>=24.2"
$PIP install -q --no-deps --ignore-requires-python megatron-core==0.19.2
$PIP install -q -e ".[test,p2p,megatron-cpu]"
echo "glm_rl installed: $(command -v glm-rl)"
