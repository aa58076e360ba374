"""Running stages one after another, as train.py and experiments/ablations.py do: the stage runner, the TRM server
around the stages that score with it, and the tiny world every tiny run starts from.

Stages run as subprocesses (their launchers or scripts, from the repository root), so no stage is imported here.

The "done" marker contract. `Pipeline.run(stage, command, done_when=FILE)` skips the stage when FILE exists (unless
--force), so a rerun of the same command continues after a crash or Ctrl-C. FILE must be what the stage writes
last, in one atomic step, so that it exists only once the stage's outputs are complete:

    stage                   done when                      written by
    assets                  assets/build_args.json         demo/build_tiny_assets.py, after the data and the model
    warm_start              policy_init/config.json        demo/warm_start.py, its model saved aside and renamed
    step 1 (tiny)           <out>/eval/metrics.json        step1_reward_model/evaluate.py (write_atomic), last
    step 1 (GPU), step 2    <out>/final/config.json        the final HF model (utils.zero3.save_hf_model: saved
                                                           aside and renamed), the stage's last write
    step 3                  <out>/summary.json             step3_eval/main.py (write_atomic), after predictions.jsonl

A stage cut short leaves its marker out; its own --resume (step 2's runs in experiments/ablations.py) then continues
from its last checkpoint.
"""
import json
import os
import shlex
import socket
import subprocess
import sys
import time

from sophiavl.utils import vllm_server
from sophiavl.utils.cli import InputError

PYTHON = sys.executable


class StageFailed(RuntimeError):
    pass


def run_stages(body) -> int:
    """body(), a pipeline's stages; returns its exit code: 0, 1 when a stage failed (its error and log tail printed),
    2 for bad input found before a stage (InputError), 130 on Ctrl-C (a TRM server started is stopped; the same
    command run again skips the finished stages)."""
    try:
        body()
    except StageFailed as err:
        print(err, file=sys.stderr)
        return 1
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    return 0


def command_shown(script: str, argv: list[str] | None, leave_out=("--report-only",)) -> str:
    """The command line that ran `script`, for a report to name (the flags of `argv`, sys.argv's by default)."""
    flags = argv if argv is not None else sys.argv[1:]
    return shlex.join(["python", script, *(a for a in flags if a not in leave_out)])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Pipeline:
    """Stages run from `root` (the repository: the launchers' paths are relative to it), their logs and outputs in
    args.output_dir. Reads args.output_dir, args.force and args.deployment_type."""

    def __init__(self, args, root: str):
        self.args, self.root = args, root
        self.out = os.path.abspath(args.output_dir)
        os.makedirs(self.out, exist_ok=True)
        self.seconds_path = self.path("stage_seconds.json")  # kept across reruns: a resumed run keeps its times
        self.seconds = {}
        if os.path.exists(self.seconds_path):
            with open(self.seconds_path) as f:
                self.seconds = json.load(f)

    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    def run(self, stage: str, command: list[str], done_when: str | None = None, env: dict | None = None) -> None:
        """Run one stage, its output to <stage>.log; skipped when `done_when` exists (unless --force)."""
        if done_when and os.path.exists(done_when) and not self.args.force:
            print(f"[{stage}] done already ({os.path.relpath(done_when, self.out)} exists), skipped")
            return
        log_path = self.path(f"{stage}.log")
        print(f"[{stage}] running, log: {log_path}", flush=True)
        start = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHON": PYTHON,
               "MASTER_PORT": str(free_port()), **(env or {})}
        if self.args.deployment_type == "single_gpu":
            env["NUM_GPUS"] = "1"
        with open(log_path, "w") as log:
            code = subprocess.call(command, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.seconds[stage] = round(time.perf_counter() - start, 1)
        with open(self.seconds_path, "w") as f:
            json.dump(self.seconds, f, indent=1)
        if code != 0:
            with open(log_path, errors="replace") as f:
                tail = "".join(f.readlines()[-30:])
            raise StageFailed(f"[{stage}] failed (exit {code}) after {self.seconds[stage]} s; last lines of "
                              f"{log_path}:\n{tail}")
        print(f"[{stage}] finished in {self.seconds[stage]} s", flush=True)


def with_trm_server(pipeline: Pipeline, trm_dir: str, max_images: int, body) -> None:
    """Start the TRM server, wait until it answers, run `body(url)`, and always stop the server.
    `max_images`: its images-per-request cap, the most of any step-2 prompt (step 2 sends them all; vLLM answers
    a request over the cap with HTTP 400); give step 2 the same number as --trm-max-images."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    print(f"[trm-server] starting vllm on {trm_dir} at {url}, at most {max_images} images per request", flush=True)
    proc = vllm_server.start_server(trm_dir, port, log_path=pipeline.path("trm_server.log"), max_model_len=4096,
                                    max_images=max_images)
    try:
        waited = vllm_server.wait_ready(url, timeout=600, proc=proc)
        print(f"[trm-server] ready after {waited:.0f} s", flush=True)
        body(url)
    finally:
        vllm_server.stop(proc)
        print("[trm-server] stopped", flush=True)


def tiny_setup(pipeline: Pipeline) -> tuple[str, str]:
    """The tiny world every tiny run starts from: synthetic tasks + random-init model, then the
    warm-started policy (policy_init/). Reads args.seed, args.tiny_train_rows, args.tiny_test_rows and
    args.warm_start_steps, and args.world and args.shortcut_fraction where they exist (experiments/
    shortcut_ablations.py's world: demo/shortcut_tasks.py). Returns (assets folder, registry file)."""
    a, out = pipeline.args, pipeline.path
    assets = out("assets")
    pipeline.run("assets", [PYTHON, "-m", "sophiavl.demo.build_tiny_assets", "--out", assets, "--seed", str(a.seed),
                            "--num-train", str(a.tiny_train_rows), "--num-test", str(a.tiny_test_rows),
                            "--world", getattr(a, "world", "default")],
                 done_when=out("assets", "build_args.json"))
    pipeline.run("warm_start", [PYTHON, "-m", "sophiavl.demo.warm_start", "--model", out("assets", "model"),
                                "--train", out("assets", "data", "tiny_train.json"), "--output", out("policy_init"),
                                "--steps", str(a.warm_start_steps), "--seed", str(a.seed),
                                "--shortcut-fraction", str(getattr(a, "shortcut_fraction", 0.0))],
                 done_when=out("policy_init", "config.json"))
    return assets, out("assets", "data", "dataset_info.json")
