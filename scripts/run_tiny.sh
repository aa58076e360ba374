#!/usr/bin/env bash
# Set up .venv (idempotent) and run the whole tiny pipeline on CPU: tiny Qwen2.5-VL and synthetic
# tasks, warm start, step 1 (TRM), step 2 (Trust-GRPO with the TRM served by vLLM), step 3 before and
# after. Outputs (summary.json, report.md, each stage's log) go to outputs/tiny-<time>/ unless
# --output-dir is given; extra arguments go to train.py (see python train.py --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python train.py --deployment-type tiny "$@"
