#!/usr/bin/env bash
# Ablation (paper Table 3): an untrained instruct model as the TRM. Serve it first under the same
# name, e.g. step1_reward_model/training_scripts/serve_vllm.sh Qwen/Qwen2.5-VL-3B-Instruct PORT REGISTRY DATA,
# then pass its URL.
# Usage: wo_trained_trm.sh OUTPUT MODEL REGISTRY DATA UNTRAINED_TRM_URL [extra main.py flags]
set -euo pipefail
(( $# >= 5 )) || { echo "usage: $(basename "$0") OUTPUT MODEL REGISTRY DATA TRM_URL [extra main.py flags]" >&2; exit 2; }
exec bash "$(dirname "$0")/../run_qwen2_5_vl_7b.sh" "${@:1:5}" --variant full "${@:6}"
