#!/usr/bin/env bash
# Ablation (paper Table 3): GRPO baseline: outcome reward only (TRM_URL is ignored).
# Usage: grpo_baseline.sh MODEL REGISTRY DATA TRM_URL [OUTPUT]
set -euo pipefail
bash "$(dirname "$0")/../run_qwen2_5_vl_7b.sh" "${1:?model}" "${2:?registry}" "${3:?data}" "${4:?TRM URL}" \
  "${5:-outputs/ablation_grpo_baseline}" --variant grpo
