#!/usr/bin/env bash
# Step 1 end to end on CPU with the tiny Qwen2.5-VL: synthetic reasoning traces of known quality ->
# filtered, balanced labels -> ZeRO-3 SFT on 2 processes -> judge evaluation on held-out traces.
# Usage: train_tiny_cpu.sh [OUTPUT] [ASSETS] [INIT_MODEL] [extra main.py flags]
#   ASSETS: a demo/build_tiny_assets.py folder (built with the defaults when missing). The judge lands in OUTPUT/final.
#   INIT_MODEL: the model the judge is fine-tuned from (default ASSETS/model, random init). The one-click
#   pipeline passes the warm-started policy: the tiny world's "instruct model", as the paper starts its TRM
#   from Qwen2.5-VL-3B-Instruct.
#   TRM_LABELS=inverted|shuffled (env): train a hacked judge / a format-only stand-in for an untrained one
#   (demo/trm_traces.py --labels); it is still evaluated against the true scores.
#   TRM_TRAIN_LABELS=FILE TRM_EVAL_LABELS=FILE (env): train on these labelled rows (annotate.py's format, e.g. the
#   oracle's labels of policy rollouts, experiments/annotated_trm.py) and evaluate on those, instead of traces.
set -euo pipefail
OUTPUT=${1:-outputs/tiny/step1}
ASSETS=${2:-outputs/tiny/assets}
shift $(( $# < 2 ? $# : 2 ))
INIT_MODEL=$ASSETS/model
if [[ $# -gt 0 && $1 != --* ]]; then INIT_MODEL=$1; shift; fi
STAGE=$(cd "$(dirname "$0")/.." && pwd)
REPO=$(dirname "$STAGE")
PY=${PYTHON:-$REPO/.venv/bin/python}
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
REGISTRY="$ASSETS/data/dataset_info.json"
mkdir -p "$OUTPUT" "$ASSETS"

{
  [[ -f "$REGISTRY" ]] || "$PY" "$REPO/demo/build_tiny_assets.py" --out "$ASSETS"  # keep assets built with other sizes
  TRAIN=${TRM_TRAIN_LABELS:-$OUTPUT/traces_train.jsonl}
  TEST=${TRM_EVAL_LABELS:-$OUTPUT/traces_test.jsonl}
  if [[ -z "${TRM_TRAIN_LABELS:-}" ]]; then
    "$PY" "$REPO/demo/trm_traces.py" --registry "$REGISTRY" --data-path tiny_train --max-rows 300 \
      --labels "${TRM_LABELS:-true}" --output "$TRAIN"
    "$PY" "$REPO/demo/trm_traces.py" --registry "$REGISTRY" --data-path tiny_test --max-rows 40 --output "$TEST"
  fi
  "$PY" "$STAGE/balance.py" --input "$TRAIN" --output "$OUTPUT/trm_train.jsonl" --cap 150

  "$(dirname "$PY")/deepspeed" --master_port "${MASTER_PORT:-29500}" --num_gpus 2 "$STAGE/main.py" \
    --model-path "$INIT_MODEL" --train-data "$OUTPUT/trm_train.jsonl" --eval-data "$TEST" \
    --output-dir "$OUTPUT" --epochs 4 --learning-rate 3e-3 --warmup-ratio 0.05 --min-lr-ratio 0.1 \
    --micro-batch-size 8 --gradient-accumulation-steps 1 --dtype float32 \
    --eval-every 50 --eval-max-samples 100 --save-every 100 --zero-param-persistence-threshold 0 "$@"

  "$PY" "$STAGE/evaluate.py" --data "$TEST" --model-path "$OUTPUT/final" \
    --output-dir "$OUTPUT/eval" --dtype float32 --plot
} 2>&1 | tee "$OUTPUT/training.log"
