"""One command, whole pipeline: step 1 (TRM) -> serve it -> step 2 (Trust-GRPO) -> step 3 (evaluation).

    python train.py                                   # the tiny CPU run (default), outputs/tiny-<time>/
    python train.py --steps 2 3 --trm-path OUT/step1/final --output-dir OUT
    python train.py --deployment-type single_node --actor-model Qwen/Qwen2.5-VL-7B-Instruct \\
        --trm-base-model Qwen/Qwen2.5-VL-3B-Instruct --registry data/dataset_info.json \\
        --data-path SophiaVL-R1-130k --trm-data trm_labels.jsonl --eval-data-path MathVista

Each stage's log goes to <output-dir>/<stage>.log; a failing stage stops the pipeline and prints
its log's tail. The TRM server is always stopped, also on failure or Ctrl-C. A stage whose outputs
exist is skipped when the command is run again (--force reruns everything).
"""
import argparse
import datetime
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

from utils.cli import InputError
from utils.data import max_images_per_prompt

REPO = os.path.dirname(os.path.abspath(__file__))
PYTHON = sys.executable
DEEPSPEED = os.path.join(os.path.dirname(PYTHON), "deepspeed")


def load_by_path(name: str, relative_path: str):
    """Stages never import each other; the pipeline loads the one helper it needs by file path."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relative_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


serve = load_by_path("trm_serve", "step1_reward_model/serve.py")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--deployment-type", choices=["tiny", "single_gpu", "single_node", "multi_node"], default="tiny")
    p.add_argument("--steps", type=int, nargs="+", choices=[1, 2, 3], default=[1, 2, 3])
    p.add_argument("--output-dir", default=None, help="default: outputs/<deployment-type>-<time>")
    p.add_argument("--trm-path", default=None, help="an existing TRM (HF directory): skips training step 1")
    p.add_argument("--force", action="store_true", help="rerun stages whose outputs already exist")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("tiny run sizes (defaults: the full tiny demo; tests shrink them)")
    g.add_argument("--tiny-train-rows", type=int, default=2000)
    g.add_argument("--tiny-test-rows", type=int, default=200)
    g.add_argument("--warm-start-steps", type=int, default=200)
    g.add_argument("--step2-steps", type=int, default=60)
    g.add_argument("--step1-extra", default="", help="extra flags for step 1's main.py, e.g. '--max-steps 20'")
    g = p.add_argument_group("GPU deployments")
    g.add_argument("--actor-model", help="policy to train, e.g. Qwen/Qwen2.5-VL-7B-Instruct")
    g.add_argument("--trm-base-model", help="model the TRM is fine-tuned from, e.g. Qwen/Qwen2.5-VL-3B-Instruct")
    g.add_argument("--registry", help="dataset_info.json")
    g.add_argument("--data-path", help="registry name(s) for step 2")
    g.add_argument("--eval-data-path", help="registry name(s) for step 3")
    g.add_argument("--trm-data", help="balanced TRM labels (JSONL) for step 1")
    g.add_argument("--hostfile", help="multi_node: DeepSpeed hostfile")
    args = p.parse_args(argv)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.output_dir = args.output_dir or os.path.join("outputs", f"{args.deployment_type}-{stamp}")
    if 1 not in args.steps and 2 in args.steps and not args.trm_path:
        p.error("--steps without 1 needs --trm-path (the TRM that step 2 scores with)")
    if args.deployment_type != "tiny":
        needed = ["actor_model", "registry", "data_path", "eval_data_path"] + (["trm_base_model", "trm_data"]
                                                                              if 1 in args.steps else [])
        missing = [f"--{n.replace('_', '-')}" for n in needed if not getattr(args, n)]
        if missing:
            p.error(f"--deployment-type {args.deployment_type} needs {' '.join(missing)}")
        if args.deployment_type == "multi_node" and not args.hostfile:
            p.error("--deployment-type multi_node needs --hostfile")
    return args


class StageFailed(RuntimeError):
    pass


class Pipeline:
    def __init__(self, args):
        self.args = args
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
            code = subprocess.call(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.seconds[stage] = round(time.perf_counter() - start, 1)
        with open(self.seconds_path, "w") as f:
            json.dump(self.seconds, f, indent=1)
        if code != 0:
            with open(log_path, errors="replace") as f:
                tail = "".join(f.readlines()[-30:])
            raise StageFailed(f"[{stage}] failed (exit {code}) after {self.seconds[stage]} s; last lines of "
                              f"{log_path}:\n{tail}")
        print(f"[{stage}] finished in {self.seconds[stage]} s", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_trm_server(pipeline: Pipeline, trm_dir: str, max_images: int, body) -> None:
    """Start the TRM server, wait until it answers, run `body(url)`, and always stop the server.
    `max_images`: its images-per-request cap, the most of any step-2 prompt (step 2 sends them all; vLLM answers
    a request over the cap with HTTP 400); step 2 gets the same number as --trm-max-images."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    print(f"[trm-server] starting vllm on {trm_dir} at {url}, at most {max_images} images per request", flush=True)
    proc = serve.start_server(trm_dir, port, log_path=pipeline.path("trm_server.log"), max_model_len=4096,
                              max_images=max_images)
    try:
        waited = serve.wait_ready(url, timeout=600, proc=proc)
        print(f"[trm-server] ready after {waited:.0f} s", flush=True)
        body(url)
    finally:
        serve.stop(proc)
        print("[trm-server] stopped", flush=True)


def tiny_setup(pipeline: Pipeline) -> tuple[str, str]:
    """The tiny world every tiny run starts from: synthetic tasks + random-init model, then the
    warm-started policy (policy_init/). Returns (assets folder, registry file)."""
    a, out = pipeline.args, pipeline.path
    assets = out("assets")
    registry = out("assets", "data", "dataset_info.json")
    pipeline.run("assets", [PYTHON, "demo/build_tiny_assets.py", "--out", assets, "--seed", str(a.seed),
                            "--num-train", str(a.tiny_train_rows), "--num-test", str(a.tiny_test_rows)],
                 done_when=registry)
    pipeline.run("warm_start", [PYTHON, "demo/warm_start.py", "--model", out("assets", "model"),
                                "--train", out("assets", "data", "tiny_train.json"), "--output", out("policy_init"),
                                "--steps", str(a.warm_start_steps), "--seed", str(a.seed)],
                 done_when=out("policy_init", "config.json"))
    return assets, registry


def tiny(pipeline: Pipeline) -> dict:
    """The tiny CPU pipeline: tiny assets, warm start, steps 1-3, summary and report."""
    a, out = pipeline.args, pipeline.path
    assets, registry = tiny_setup(pipeline)
    trm_dir = a.trm_path or out("step1", "final")
    if 1 in a.steps and not a.trm_path:
        pipeline.run("step1", ["bash", "step1_reward_model/training_scripts/train_tiny_cpu.sh", out("step1"), assets,
                               out("policy_init"), *a.step1_extra.split()],
                     done_when=out("step1", "eval", "metrics.json"))
    if 2 in a.steps:
        max_images = max_images_per_prompt("tiny_train", registry)  # the data run_tiny_cpu.sh trains on

        def step2(url):
            pipeline.run("step2", ["bash", "step2_trust_grpo/training_scripts/run_tiny_cpu.sh", out("policy_init"),
                                   registry, out("step2"), url, "--max-steps", str(a.step2_steps),
                                   "--save-every", str(max(a.step2_steps // 3, 1)),
                                   "--eval-every", str(max(a.step2_steps // 3, 1)),
                                   "--trm-max-images", str(max_images)],
                         done_when=out("step2", "final", "config.json"))
        if os.path.exists(out("step2", "final", "config.json")) and not a.force:
            step2(None)
        else:
            with_trm_server(pipeline, trm_dir, max_images, step2)
    if 3 in a.steps:
        for stage, model in (("step3_before", out("policy_init")), ("step3_after", out("step2", "final"))):
            pipeline.run(stage, ["bash", "step3_eval/training_scripts/run_tiny_cpu.sh", model, registry, out(stage)],
                         done_when=out(stage, "summary.json"))
    report = load_by_path("tiny_report", "demo/report.py")
    return report.write_report(pipeline.out, pipeline.seconds)


def gpus(pipeline: Pipeline) -> None:
    """Real scale: the GPU launchers of each stage, one after another."""
    a, out = pipeline.args, pipeline.path
    trm_dir = a.trm_path or out("step1", "final")
    step2_launcher = "step2_trust_grpo/training_scripts/run_qwen2_5_vl_7b.sh"
    if 1 in a.steps and not a.trm_path:
        pipeline.run("step1", ["bash", "step1_reward_model/training_scripts/train_qwen2_5_vl_3b.sh", out("step1"),
                               a.trm_base_model, a.trm_data], done_when=out("step1", "final", "config.json"))
    if 2 in a.steps:
        if a.deployment_type == "multi_node":
            command = ["bash", "step2_trust_grpo/training_scripts/run_multinode.sh", a.hostfile, a.actor_model,
                       a.registry, a.data_path]
        else:
            command = ["bash", step2_launcher, a.actor_model, a.registry, a.data_path]
        max_images = max_images_per_prompt(a.data_path, a.registry)
        with_trm_server(pipeline, trm_dir, max_images, lambda url: pipeline.run(
            "step2", command + [url, out("step2"), "--trm-max-images", str(max_images)],
            done_when=out("step2", "final", "config.json")))
    if 3 in a.steps:
        for stage, model in (("step3_before", a.actor_model), ("step3_after", out("step2", "final"))):
            pipeline.run(stage, ["bash", "step3_eval/training_scripts/run_qwen2_5_vl_7b.sh", model, a.registry,
                                 a.eval_data_path, out(stage)], done_when=out(stage, "summary.json"))


def main(argv=None) -> int:
    args = parse_args(argv)
    pipeline = Pipeline(args)
    start = time.perf_counter()
    try:
        if args.deployment_type == "tiny":
            summary = tiny(pipeline)
            print(json.dumps(summary, indent=2))
        else:
            gpus(pipeline)
    except StageFailed as err:
        print(err, file=sys.stderr)
        return 1
    except InputError as err:  # step 2's data, read here for the TRM server's image cap
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the TRM server (if any) was stopped", file=sys.stderr)
        return 130
    print(f"pipeline finished in {time.perf_counter() - start:.0f} s; outputs in {pipeline.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
