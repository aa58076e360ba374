#!/usr/bin/env bash
# Dr. GRPO (Liu et al. 2025) with the thinking reward: the paper's Trust-GRPO run on Qwen2.5-VL-7B-Instruct with
# the two biases Dr. GRPO removes gone: advantages not divided by the group's std, and the loss a token sum over
# (completions x --max-completion-length) instead of per-response means (README "GRPO variants"). Everything else,
# the KL term and the trust-weighted, annealed thinking reward included, is the paper's.
# Start the TRM first (step1_reward_model/training_scripts/serve_vllm.sh) and pass its URL.
# Usage: run_dr_grpo_7b.sh MODEL REGISTRY DATA TRM_URL [OUTPUT] [extra flags]
set -euo pipefail
MODEL=${1:?e.g. Qwen/Qwen2.5-VL-7B-Instruct}
REGISTRY=${2:?dataset_info.json}
DATA=${3:?registry names, e.g. SophiaVL-R1-130k}
TRM_URL=${4:?e.g. http://trm-host:8000/v1}
OUTPUT=${5:-outputs/step2_dr_grpo_7b}
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
  --learning-rate 5e-7 --kl-coef 0.04 --entropy-coef 1e-3 --alpha 0.3 --max-steps 1500 \
  --scale-rewards none --loss-agg seq-mean-token-sum-norm \
  --save-every 100 --sample-every 10 "$@" &> "$OUTPUT/training.log"
