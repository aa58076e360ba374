#!/usr/bin/env bash
# Evaluate the tiny model on the synthetic held-out split, 2 CPU processes.
# Usage: run_tiny_cpu.sh OUTPUT MODEL REGISTRY [extra main.py flags]
set -euo pipefail
OUTPUT=${1:?output folder, e.g. outputs/tiny/step3}
MODEL=${2:?model dir}
REGISTRY=${3:?dataset_info.json}
shift 3
STAGE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$(dirname "$STAGE")/.venv/bin/python}
export OMP_NUM_THREADS=1
mkdir -p "$OUTPUT"

"$(dirname "$PY")/deepspeed" --master_port "${MASTER_PORT:-29500}" --num_gpus 2 "$STAGE/main.py" \
  --model-path "$MODEL" --registry "$REGISTRY" --data-path tiny_test \
  --output-dir "$OUTPUT" --backend hf --prompt-template train \
  --batch-size 16 --max-new-tokens 32 --dtype float32 "$@" 2>&1 | tee "$OUTPUT/training.log"
