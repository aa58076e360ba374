#!/usr/bin/env bash
# Evaluate the tiny model on the synthetic held-out split, 2 CPU processes.
# Usage: run_tiny_cpu.sh MODEL REGISTRY OUTPUT [extra flags]
set -euo pipefail
MODEL=${1:?model dir}
REGISTRY=${2:?dataset_info.json}
OUTPUT=${3:-outputs/tiny/step3}
shift 3 || true
mkdir -p "$OUTPUT"
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
"$(dirname "$PY")/deepspeed" --master_port "${MASTER_PORT:-29500}" --num_gpus 2 step3_eval/main.py \
  --model-path "$MODEL" --registry "$REGISTRY" --data-path tiny_test \
  --output-dir "$OUTPUT" --backend hf --prompt-template train \
  --batch-size 16 --max-new-tokens 32 --dtype float32 "$@" 2>&1 | tee "$OUTPUT/eval.log"
