#!/usr/bin/env bash
# Trust-GRPO rewards (thinking reward, trust weight, annealing) trained the DAPO way (Yu et al. 2025), on
# Qwen2.5-VL-7B-Instruct, one node of 8 GPUs: clip-higher 0.2 / 0.28, dynamic sampling (zero-spread groups of the
# final reward refilled), the step-global token mean, the soft overlong penalty over the last 256 of 1,024 tokens,
# no KL term (DAPO's beta 0), and the truncated rollout importance weights of the vLLM engine (README "GRPO variants").
# Start the TRM first (step1_reward_model/training_scripts/serve_vllm.sh) and pass its URL.
# Usage: run_dapo_7b.sh MODEL REGISTRY DATA TRM_URL [OUTPUT] [extra flags]
set -euo pipefail
MODEL=${1:?e.g. Qwen/Qwen2.5-VL-7B-Instruct}
REGISTRY=${2:?dataset_info.json}
DATA=${3:?registry names, e.g. SophiaVL-R1-130k}
TRM_URL=${4:?e.g. http://trm-host:8000/v1}
OUTPUT=${5:-outputs/step2_dapo_7b}
shift $(( $# < 5 ? $# : 5 ))
cd "$(dirname "$0")/../.."
mkdir -p "$OUTPUT"
deepspeed --num_gpus "${NUM_GPUS:-8}" step2_trust_grpo/main.py \
  --model-path "$MODEL" --registry "$REGISTRY" --data-path "$DATA" --output-dir "$OUTPUT" \
  --trm-url "$TRM_URL" --trm-model thinking-reward-model \
  --rollout-engine vllm --vllm-gpu-memory-utilization 0.4 --vllm-sleep-mode \
  --num-generations 8 --rollout-batch-size 128 --micro-batch-size 4 \
  --max-prompt-length 4096 --max-completion-length 1024 --min-pixels 3136 --max-pixels 1003520 \
  --dtype bfloat16 --attn-implementation flash_attention_2 --gradient-checkpointing \
  --learning-rate 5e-7 --kl-coef 0 --entropy-coef 1e-3 --alpha 0.3 --max-steps 1500 \
  --clip-eps-low 0.2 --clip-eps-high 0.28 --dynamic-sampling --dynamic-sampling-max-rounds 4 \
  --loss-agg token-mean-global --overlong-buffer 256 --overlong-penalty 1.0 --rollout-is tis --rollout-is-cap 2 \
  --save-every 100 --sample-every 10 "$@" &> "$OUTPUT/training.log"
