#!/usr/bin/env bash
# GLM-4.5-Air with disaggregated training and rollout and P2P weight transfer (see README.md next to this file).
#
#   32 trainer GPUs (4 nodes): Megatron TP1 PP4 EP8 (46 layers as 11 + 12 + 12 + 11), DP8, CPU Adam
#   32 rollout GPUs (4 nodes): 4 SGLang engines of 8 GPUs
#   weight sync: --update-weight-transfer-mode p2p (Mooncake one-sided writes, every trainer rank a sender)
#
# Run on the Ray head of a 64-GPU cluster (8 nodes x 8 GPUs already joined, e.g. by launchers/*.sh), with
#   HF_CHECKPOINT   GLM-4.5-Air HF checkpoint directory
#   TORCH_DIST      the same converted by tools/convert_hf_to_torch_dist.py
#   PROMPT_DATA     JSONL prompts
#   WORK_DIR        where saves and outputs go
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail

for var in HF_CHECKPOINT TORCH_DIST PROMPT_DATA WORK_DIR; do
  if [[ -z "${!var:-}" ]]; then
    echo "error: set $var (see the header of $0)" >&2
    exit 2
  fi
done
run() { if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }

LAYOUT=(
  --tensor-model-parallel-size 1 --pipeline-model-parallel-size 4 --context-parallel-size 1
  --expert-model-parallel-size 8 --expert-tensor-parallel-size 1
  --decoder-first-pipeline-num-layers 11 --decoder-last-pipeline-num-layers 11
)
MEMORY=(--max-tokens-per-gpu 8192 --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
        --optimizer-cpu-offload)

# 1. the plan: layout check, per-GPU memory, predicted sync time (exits non-zero if it cannot run)
run glm-rl plan --model-preset glm45-air-106b-a12b --num-nodes 8 --gpus-per-node 8 --hardware "${HARDWARE:-H100}" \
  "${LAYOUT[@]}" "${MEMORY[@]}" --rollout-num-gpus 32 --rollout-num-gpus-per-engine 8 \
  --update-weight-transfer-mode p2p

# 2. the run
run ray job submit --address "${RAY_DASHBOARD:-http://127.0.0.1:8265}" \
  --runtime-env-json '{"env_vars": {"NCCL_CUMEM_ENABLE": "0", "PYTHONUNBUFFERED": "1"}}' -- \
  glm-rl train --backend megatron --num-trainer-ranks 32 "${LAYOUT[@]}" "${MEMORY[@]}" \
  --hf-checkpoint "$HF_CHECKPOINT" --model-preset glm45-air-106b-a12b \
  --ref-load "$TORCH_DIST" --load "$TORCH_DIST" --save "$WORK_DIR/GLM-4.5-Air_p2p" --output-dir "$WORK_DIR/outputs/air_p2p" \
  --prompt-data "$PROMPT_DATA" --rollout-batch-size 32 --n-samples-per-prompt 8 --global-batch-size 256 --lr 1e-6 \
  --advantage-estimator gspo --eps-clip 1e-4 --eps-clip-high 2e-4 --use-tis --use-rollout-routing-replay \
  --rollout-engine sglang --num-engines 4 --rollout-num-gpus-per-engine 8 --sglang-mem-fraction-static 0.7 \
  --update-weight-transfer-mode p2p --ray-address auto
