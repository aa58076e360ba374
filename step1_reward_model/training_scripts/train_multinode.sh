#!/usr/bin/env bash
# The 3B TRM on several nodes with DeepSpeed's launcher (pdsh/ssh to every host of the hostfile).
# Usage: train_multinode.sh OUTPUT HOSTFILE TRAIN_JSONL [MODEL] [extra main.py flags]
#   HOSTFILE: one "hostname slots=8" line per node. The repository, the .venv, the data and OUTPUT must
#   be at the same paths on every node, and OUTPUT on shared storage (every rank writes its checkpoint shard).
set -euo pipefail
OUTPUT=${1:?output folder on shared storage, e.g. outputs/trm_qwen2_5_vl_3b_multinode}
HOSTFILE=${2:?DeepSpeed hostfile, one line per node: hostname slots=8}
TRAIN=${3:?balanced labels JSONL (balance.py output)}
MODEL=${4:-Qwen/Qwen2.5-VL-3B-Instruct}
shift $(( $# < 4 ? $# : 4 ))
STAGE=$(cd "$(dirname "$0")/.." && pwd)
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
mkdir -p "$OUTPUT"

# 2 nodes x 8 GPUs x micro-batch 4 x accumulation 2 = 128 rows per step, as on one node.
RUN=("$STAGE/main.py" \
  --model-path "$MODEL" --train-data "$TRAIN" --output-dir "$OUTPUT" \
  --epochs 2 --learning-rate 1e-5 --warmup-ratio 0.03 \
  --micro-batch-size 4 --gradient-accumulation-steps 2 --dtype bfloat16 \
  --attn-implementation auto --gradient-checkpointing \
  --min-pixels 3136 --max-pixels 1003520 \
  --eval-split-fraction 0.01 --eval-every 250 --eval-max-samples 512 --save-every 500 "$@")
# the memory plan of this very command line first (docs/memory_plan.md); PLAN_ONLY=1 stops after it
read -r WORLD LOCAL < <(awk 'NF && $1 !~ /^#/ {n++; split($2, s, "="); t += s[2]} END {print t, int(t / n)}' "$HOSTFILE")
WORLD_SIZE=$WORLD LOCAL_WORLD_SIZE=$LOCAL "${PYTHON:-python}" "${RUN[@]}" --plan 2>&1 | tee "$OUTPUT/training.log" \
  || echo "(no memory plan for $MODEL)" | tee -a "$OUTPUT/training.log"
[[ -z "${PLAN_ONLY:-}" ]] || exit 0
deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  "${RUN[@]}" 2>&1 | tee -a "$OUTPUT/training.log"
