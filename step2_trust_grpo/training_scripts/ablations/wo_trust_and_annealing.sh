#!/usr/bin/env bash
# Ablation (paper Table 3): gamma = 1 and no exp(-step/T) factor.
# Usage: wo_trust_and_annealing.sh OUTPUT MODEL REGISTRY DATA TRM_URL [extra main.py flags]
set -euo pipefail
(( $# >= 5 )) || { echo "usage: $(basename "$0") OUTPUT MODEL REGISTRY DATA TRM_URL [extra main.py flags]" >&2; exit 2; }
exec bash "$(dirname "$0")/../run_qwen2_5_vl_7b.sh" "${@:1:5}" --variant wo-trust-and-annealing "${@:6}"
