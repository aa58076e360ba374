#!/usr/bin/env bash
# Trust-GRPO on Qwen3-VL-8B-Instruct, one node of 8 GPUs, with the paper's settings (docs/method.md):
# 1,500 steps, N=8, lr 5e-7, KL 0.04, entropy 1e-3, alpha 0.3, annealing horizon = steps.
# Qwen3-VL resizes images to multiples of 32 (patch 16 x merge 2): the pixel limits below give 4 to 1,280 image
# tokens, as 3136 / 1003520 do for Qwen2.5-VL's 28. Its model card recommends top_p 0.8, top_k 20, temperature 0.7
# and presence_penalty 1.5 for chat; the rollouts do not inherit them (step 2 sets every sampling field, here the
# GRPO defaults: temperature 1.0, no top-p/top-k cut). The 8B model unties its embeddings; the 2B and 4B tie them.
# Start the TRM first (step1_reward_model/training_scripts/serve_vllm.sh; any family) and pass its URL.
# Usage: run_qwen3_vl_8b.sh OUTPUT MODEL REGISTRY DATA TRM_URL [extra main.py flags, e.g. --variant wo-trust]
set -euo pipefail
OUTPUT=${1:?output folder, e.g. outputs/step2_qwen3_vl_8b}
MODEL=${2:?e.g. Qwen/Qwen3-VL-8B-Instruct}
REGISTRY=${3:?dataset_info.json}
DATA=${4:?registry names, e.g. SophiaVL-R1-130k}
TRM_URL=${5:?e.g. http://trm-host:8000/v1}
shift 5
STAGE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUTPUT"

RUN=("$STAGE/main.py" \
  --model-path "$MODEL" --registry "$REGISTRY" --data-path "$DATA" --output-dir "$OUTPUT" \
  --trm-url "$TRM_URL" --trm-model thinking-reward-model \
  --rollout-engine vllm --vllm-gpu-memory-utilization 0.4 --vllm-sleep-mode \
  --num-generations 8 --rollout-batch-size 128 --micro-batch-size 4 \
  --max-prompt-length 4096 --max-completion-length 1024 --min-pixels 4096 --max-pixels 1310720 \
  --dtype bfloat16 --attn-implementation auto --gradient-checkpointing \
  --learning-rate 5e-7 --kl-coef 0.04 --entropy-coef 1e-3 --alpha 0.3 --max-steps 1500 \
  --save-every 100 --sample-every 10 "$@")
# the memory plan of this very command line first (docs/memory_plan.md); PLAN_ONLY=1 stops after it
WORLD=${NUM_GPUS:-8} LOCAL=${NUM_GPUS:-8}
WORLD_SIZE=$WORLD LOCAL_WORLD_SIZE=$LOCAL "${PYTHON:-python}" "${RUN[@]}" --plan 2>&1 | tee "$OUTPUT/training.log" \
  || echo "(no memory plan for $MODEL)" | tee -a "$OUTPUT/training.log"
[[ -z "${PLAN_ONLY:-}" ]] || exit 0
deepspeed --num_gpus "${NUM_GPUS:-8}" "${RUN[@]}" 2>&1 | tee -a "$OUTPUT/training.log"
