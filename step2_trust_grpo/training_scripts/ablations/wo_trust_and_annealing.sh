#!/usr/bin/env bash
# Ablation (paper Table 3): gamma = 1 and no exp(-step/T) factor.
# Usage: wo_trust_and_annealing.sh MODEL REGISTRY DATA TRM_URL [OUTPUT]
set -euo pipefail
bash "$(dirname "$0")/../run_qwen2_5_vl_7b.sh" "${1:?model}" "${2:?registry}" "${3:?data}" "${4:?TRM URL}" \
  "${5:-outputs/ablation_wo_trust_and_annealing}" --variant wo-trust-and-annealing
