#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR disable=SC2034  # RECIPE_* are read by lib/common.sh
# GLM-4.5 (355B-A32B) RL on 64 GPUs (8 nodes x 8), colocated: Megatron TP8 PP4 CP2 EP16 ETP1 with sequence
# parallel, CPU Adam, flex dispatcher with DeepEP; GSPO with TIS and rollout routing replay (R3); SGLang engines
# of 32 GPUs with DP attention. `--help` lists the launcher's options; glm-rl train flags go after `--`:
#   launchers/run-glm4.5-355B-A32B.sh --hostfile hosts --hf-checkpoint GLM-4.5 --ref-load GLM-4.5_torch_dist \
#     --prompt-data train.jsonl --save ckpt --stop-on-exit
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

RECIPE_NAME=glm4.5-355B-A32B
RECIPE_GPUS=64
RECIPE_ARGS=(
  --model-preset glm45-355b-a32b --dtype bfloat16
  # trainer: 64 ranks = TP8 x PP4 x CP2 (DP 1); experts EP16 x ETP1 (expert DP 1); 92 layers = 4 x 23
  --backend megatron --num-trainer-ranks 64
  --tensor-model-parallel-size 8 --pipeline-model-parallel-size 4 --context-parallel-size 2
  --expert-model-parallel-size 16 --expert-tensor-parallel-size 1 --sequence-parallel
  --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
  --max-tokens-per-gpu 16384 --optimizer-cpu-offload --use-precision-aware-optimizer
  --moe-token-dispatcher-type flex --moe-enable-deepep
  --lr 1e-6 --weight-decay 0.1 --adam-beta2 0.98
  # algorithm: GSPO (sequence-level ratio), tight clips, TIS on the train/rollout mismatch, R3
  --advantage-estimator gspo --eps-clip 1e-4 --eps-clip-high 2e-4 --use-tis --use-rollout-routing-replay
  --kl-loss-coef 0.0
  # rollout: 64 prompts x 8 samples per step, one optimizer step per rollout
  --num-rollout 3000 --rollout-batch-size 64 --n-samples-per-prompt 8 --global-batch-size 512
  --rollout-max-response-len 8192 --rollout-temperature 1.0 --save-interval 20
  # engines: SGLang, 2 x 32 GPUs (bf16 355B does not fit 8 x 80 GB), colocated with the trainer
  --colocate --rollout-engine sglang --num-engines 2 --rollout-num-gpus-per-engine 32
  --update-weight-transfer-mode broadcast
  --sglang-mem-fraction-static 0.7 --sglang-enable-dp-attention --sglang-dp-size 4 --sglang-ep-size 32
)

glm_main "$@"
