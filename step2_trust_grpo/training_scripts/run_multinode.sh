#!/usr/bin/env bash
# Trust-GRPO across nodes: the 7B recipe launched through a DeepSpeed hostfile
# (one line per node: "hostname slots=8"). Run on the first node; the others need the same
# repo path and environment, and OUTPUT on shared storage (every rank writes its checkpoint shard).
# Usage: run_multinode.sh OUTPUT HOSTFILE MODEL REGISTRY DATA TRM_URL [extra main.py flags]
set -euo pipefail
OUTPUT=${1:?output folder on shared storage}
HOSTFILE=${2:?hostfile}
MODEL=${3:?model}
REGISTRY=${4:?dataset_info.json}
DATA=${5:?registry names}
TRM_URL=${6:?TRM URL reachable from every node}
shift 6
STAGE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUTPUT"

RUN=("$STAGE/main.py" \
  --model-path "$MODEL" --registry "$REGISTRY" --data-path "$DATA" --output-dir "$OUTPUT" \
  --trm-url "$TRM_URL" --rollout-engine vllm --vllm-gpu-memory-utilization 0.4 --vllm-sleep-mode \
  --num-generations 8 --rollout-batch-size 256 --micro-batch-size 4 --max-completion-length 1024 \
  --min-pixels 3136 --max-pixels 1003520 --dtype bfloat16 --attn-implementation auto \
  --gradient-checkpointing --learning-rate 5e-7 --kl-coef 0.04 --max-steps 1500 --save-every 100 \
  "$@")
# the memory plan of this very command line first (docs/memory_plan.md); PLAN_ONLY=1 stops after it
read -r WORLD LOCAL < <(awk 'NF && $1 !~ /^#/ {n++; split($2, s, "="); t += s[2]} END {print t, int(t / n)}' "$HOSTFILE")
WORLD_SIZE=$WORLD LOCAL_WORLD_SIZE=$LOCAL "${PYTHON:-python}" "${RUN[@]}" --plan 2>&1 | tee "$OUTPUT/training.log" \
  || echo "(no memory plan for $MODEL)" | tee -a "$OUTPUT/training.log"
[[ -z "${PLAN_ONLY:-}" ]] || exit 0
deepspeed --hostfile "$HOSTFILE" "${RUN[@]}" 2>&1 | tee -a "$OUTPUT/training.log"
