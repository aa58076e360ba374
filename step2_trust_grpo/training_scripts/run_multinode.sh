#!/usr/bin/env bash
# Trust-GRPO across nodes: the 7B recipe launched through a DeepSpeed hostfile
# (one line per node: "hostname slots=8"). Run on the first node; the others need the same
# repo path and environment. Usage: run_multinode.sh HOSTFILE MODEL REGISTRY DATA TRM_URL [OUTPUT] [extra]
set -euo pipefail
HOSTFILE=${1:?hostfile}
MODEL=${2:?model}
REGISTRY=${3:?dataset_info.json}
DATA=${4:?registry names}
TRM_URL=${5:?TRM URL reachable from every node}
OUTPUT=${6:-outputs/step2_multinode}
shift $(( $# < 6 ? $# : 6 ))
cd "$(dirname "$0")/../.."
mkdir -p "$OUTPUT"
deepspeed --hostfile "$HOSTFILE" step2_trust_grpo/main.py \
  --model-path "$MODEL" --registry "$REGISTRY" --data-path "$DATA" --output-dir "$OUTPUT" \
  --trm-url "$TRM_URL" --rollout-engine vllm --vllm-gpu-memory-utilization 0.4 --vllm-sleep-mode \
  --num-generations 8 --rollout-batch-size 256 --micro-batch-size 4 --max-completion-length 1024 \
  --min-pixels 3136 --max-pixels 1003520 --dtype bfloat16 --attn-implementation auto \
  --gradient-checkpointing --learning-rate 5e-7 --kl-coef 0.04 --max-steps 1500 --save-every 100 \
  "$@" &> "$OUTPUT/training.log"
