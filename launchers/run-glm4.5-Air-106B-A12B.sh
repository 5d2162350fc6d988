#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR disable=SC2034  # RECIPE_* are read by lib/common.sh
# GLM-4.5-Air (106B-A12B) RL on 32 GPUs (4 nodes x 8), colocated: Megatron TP1 PP4 EP8 ETP1 (DP 8), the 46
# layers split 12/12/12/10 (the last stage also holds the LM head), CPU Adam; GSPO with TIS and rollout routing
# replay (R3); SGLang engines of 8 GPUs. `--help` lists the launcher's options; glm-rl train flags go after `--`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

RECIPE_NAME=glm4.5-Air-106B-A12B
RECIPE_GPUS=32
RECIPE_ARGS=(
  --model-preset glm45-air-106b-a12b --dtype bfloat16
  # trainer: 32 ranks = TP1 x PP4 (DP 8); experts EP8 x ETP1 (128 experts, 16 per rank)
  --backend megatron --num-trainer-ranks 32
  --tensor-model-parallel-size 1 --pipeline-model-parallel-size 4 --context-parallel-size 1
  --expert-model-parallel-size 8 --expert-tensor-parallel-size 1 --decoder-last-pipeline-num-layers 10
  --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
  --max-tokens-per-gpu 16384 --optimizer-cpu-offload --use-precision-aware-optimizer
  --moe-token-dispatcher-type alltoall
  --lr 1e-6 --weight-decay 0.1 --adam-beta2 0.98
  # algorithm: GSPO, tight clips, TIS, R3
  --advantage-estimator gspo --eps-clip 1e-4 --eps-clip-high 2e-4 --use-tis --use-rollout-routing-replay
  --kl-loss-coef 0.0
  # rollout: 64 prompts x 8 samples per step, one optimizer step per rollout (512 = 8 DP ranks x 64)
  --num-rollout 3000 --rollout-batch-size 64 --n-samples-per-prompt 8 --global-batch-size 512
  --rollout-max-response-len 8192 --rollout-temperature 1.0 --save-interval 20
  # engines: SGLang, 4 x 8 GPUs (bf16 Air is ~212 GB), colocated with the trainer
  --colocate --rollout-engine sglang --num-engines 4 --rollout-num-gpus-per-engine 8
  --update-weight-transfer-mode broadcast
  --sglang-mem-fraction-static 0.7
)

glm_main "$@"
