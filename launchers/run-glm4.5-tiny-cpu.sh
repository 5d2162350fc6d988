#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR disable=SC2034  # RECIPE_* are read by lib/common.sh
# The CPU twin of the GLM-4.5 recipes: the same launcher (hostfile, Ray over a remote shell, job submission) on
# machines without GPUs, training the shipped tiny GLM-4.5 on the arithmetic task. A hostfile slot is a logical
# CPU here; 4 slots in all run 2 trainer ranks and 2 embedded engines. The tests start it on two "hosts".
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

RECIPE_NAME=glm4.5-tiny-cpu
RECIPE_GPUS=0
RECIPE_HF_CHECKPOINT="$GLM_REPO_DIR/glm_rl/assets/glm45-tiny"
RECIPE_PROMPT_DATA="$GLM_REPO_DIR/glm_rl/assets/arith/train.jsonl"
RECIPE_NEEDS_REF_LOAD=0
RECIPE_ARGS=(
  --model-preset glm45-tiny --dtype float32 --backend torch --num-trainer-ranks 2
  --advantage-estimator gspo --use-tis --use-rollout-routing-replay
  --num-rollout 20 --rollout-batch-size 8 --n-samples-per-prompt 4
  --rollout-engine embedded --num-engines 2 --update-weight-transfer-mode broadcast
)

glm_main "$@"
