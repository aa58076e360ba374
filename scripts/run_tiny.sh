#!/usr/bin/env bash
# Set up .venv (idempotent) and run the tiny CPU pipeline: build the tiny Qwen2.5-VL and the
# synthetic tasks, then evaluate it with step 3. Outputs go to ${OUTPUT:-outputs/tiny}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUTPUT=${OUTPUT:-outputs/tiny}
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python demo/build_tiny_assets.py --out "$OUTPUT/assets"
bash step3_eval/training_scripts/run_tiny_cpu.sh "$OUTPUT/assets/model" "$OUTPUT/assets/data/dataset_info.json" "$OUTPUT/step3"
