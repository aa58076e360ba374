#!/usr/bin/env bash
# Set up .venv (idempotent) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the benchmarks' baseline (TRL), so that CI runs every benchmark script on its tiny setting too
.venv/bin/python -m pip install --quiet -r benchmarks/requirements.txt 2>&1 | grep -v "is ignored" || true
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
# 2 workers: while one runs a single-process stretch (a server start, a model build) the other fills the idle core;
# the files that share an expensive run stay in one worker (tests/conftest.py: SHARED_RUNS). -n 0: one process
exec .venv/bin/python -m pytest tests -n 2 --durations=25 "$@"
