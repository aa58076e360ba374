"""One command, whole pipeline: step 1 (TRM) -> serve it -> step 2 (Trust-GRPO) -> step 3 (evaluation).

    python train.py                                   # the tiny CPU run (default), outputs/tiny-<time>/
    python train.py --steps 2 3 --trm-path OUT/step1/final --output-dir OUT
    python train.py --deployment-type single_node --actor-model Qwen/Qwen2.5-VL-7B-Instruct \\
        --trm-base-model Qwen/Qwen2.5-VL-3B-Instruct --registry data/dataset_info.json \\
        --data-path SophiaVL-R1-130k --trm-data trm_labels.jsonl --eval-data-path MathVista

Each stage's log goes to <output-dir>/<stage>.log; a failing stage stops the pipeline and prints
its log's tail. The TRM server is always stopped, also on failure or Ctrl-C. A stage whose outputs
exist is skipped when the command is run again (--force reruns everything): the "done" markers of
utils/pipeline.py.
"""
import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

from sophiavl.demo.report import write_report
from sophiavl.utils.cli import InputError
from sophiavl.utils.data import max_images_per_prompt
from sophiavl.utils.model_family import Family, family_of
from sophiavl.utils.pipeline import PYTHON, Pipeline, run_stages, tiny_setup, with_trm_server

REPO = os.path.dirname(os.path.abspath(__file__))
# The GPU launchers by the family's resize factor (utils/model_family.py): Qwen2/2.5-VL snap images to multiples of
# 28, Qwen3-VL and Qwen3.5 to 32, whose launchers are the Qwen2.5-VL recipes with their own pixel limits
# (docs/model_families.md, "Launchers"): 3136 / 1003520 and 4096 / 1310720 both give 4 to 1,280 image tokens.
LAUNCHERS = {
    28: {"step1": "step1_reward_model/training_scripts/train_qwen2_5_vl_3b.sh",
         "step2": "step2_trust_grpo/training_scripts/run_qwen2_5_vl_7b.sh", "pixels": []},
    32: {"step1": "step1_reward_model/training_scripts/train_qwen3_vl_4b.sh",
         "step2": "step2_trust_grpo/training_scripts/run_qwen3_vl_8b.sh",
         "pixels": ["--min-pixels", "4096", "--max-pixels", "1310720"]},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--deployment-type", choices=["tiny", "single_gpu", "single_node", "multi_node"], default="tiny")
    p.add_argument("--steps", type=int, nargs="+", choices=[1, 2, 3], default=[1, 2, 3])
    p.add_argument("--output-dir", default=None, help="default: outputs/<deployment-type>-<time>")
    p.add_argument("--trm-path", default=None, help="an existing TRM (HF directory): skips training step 1")
    p.add_argument("--force", action="store_true", help="rerun stages whose outputs already exist")
    p.add_argument("--plan", action="store_true",
                   help="GPU deployments: print the memory plans of steps 1 and 2 as their launchers would run them "
                        "(docs/memory_plan.md) and exit; reads only the models' config.json")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("tiny run sizes (defaults: the full tiny demo; tests shrink them)")
    g.add_argument("--tiny-train-rows", type=int, default=2000)
    g.add_argument("--tiny-test-rows", type=int, default=200)
    g.add_argument("--warm-start-steps", type=int, default=200)
    g.add_argument("--step2-steps", type=int, default=60)
    g.add_argument("--step1-extra", default="", help="extra flags for step 1's main.py, e.g. '--max-steps 20'")
    g = p.add_argument_group("GPU deployments")
    g.add_argument("--actor-model", help="policy to train, e.g. Qwen/Qwen2.5-VL-7B-Instruct or Qwen/Qwen3-VL-8B-Instruct: "
                   "any family of docs/model_families.md, whose launchers its config.json picks")
    g.add_argument("--trm-base-model", help="model the TRM is fine-tuned from, e.g. Qwen/Qwen2.5-VL-3B-Instruct "
                   "(any family, also another than the policy's)")
    g.add_argument("--registry", help="dataset_info.json")
    g.add_argument("--data-path", help="registry name(s) for step 2")
    g.add_argument("--eval-data-path", help="registry name(s) for step 3")
    g.add_argument("--trm-data", help="balanced TRM labels (JSONL) for step 1")
    g.add_argument("--hostfile", help="multi_node: DeepSpeed hostfile")
    args = p.parse_args(argv)
    # the stages run from the repository root: the user's relative paths are made absolute here, against the folder
    # train.py was started from (a model that is not a local folder is a hub name and stays as it is)
    for name in ("registry", "trm_data", "hostfile", "trm_path", "actor_model", "trm_base_model"):
        value = getattr(args, name)
        if value and (name in ("registry", "trm_data", "hostfile", "trm_path") or os.path.exists(value)):
            setattr(args, name, os.path.abspath(value))
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
            pipeline.run("step2", ["bash", "step2_trust_grpo/training_scripts/run_tiny_cpu.sh", out("step2"),
                                   out("policy_init"), registry, url or "none", "--max-steps", str(a.step2_steps),
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
            pipeline.run(stage, ["bash", "step3_eval/training_scripts/run_tiny_cpu.sh", out(stage), model, registry],
                         done_when=out(stage, "summary.json"))
    return write_report(pipeline.out, pipeline.seconds)


def model_family(model: str) -> Family:
    """The family of a model folder (its config.json) or of a hub name: the shipped config of that name
    (utils/model_configs) or else the hub's config.json, which is all that is downloaded."""
    from sophiavl.utils.memory_plan import load_config

    if os.path.exists(model):
        return family_of(model)
    try:
        _, config = load_config(model)
    except InputError:
        try:
            from huggingface_hub import hf_hub_download

            with open(hf_hub_download(model, "config.json"), encoding="utf-8") as f:
                config = json.load(f)
        except Exception as err:  # no network, no such repository, no access: all the same to the user
            raise InputError(f"{model}: neither a model folder nor a shipped config, and its config.json could not "
                             f"be fetched from the hub ({type(err).__name__}); pass a local folder") from None
    try:
        return family_of(config)
    except InputError as err:
        raise InputError(f"{model}: {err}") from None


def gpu_commands(args, out, trm_url: str | None) -> dict:
    """The GPU launchers of a deployment by stage, outputs under out(stage), each the one of its model's family:
    step 1 the TRM base model's, steps 2 and 3 the policy's. Step 2 (only with a `trm_url`) still needs the image
    cap. Run by gpus(), planned by print_plans()."""
    commands = {}
    if 1 in args.steps and not args.trm_path:
        launcher = LAUNCHERS[model_family(args.trm_base_model).resize_factor]["step1"]
        commands["step1"] = ["bash", launcher, out("step1"), args.trm_data, args.trm_base_model]
    policy = LAUNCHERS[model_family(args.actor_model).resize_factor]
    if 2 in args.steps and trm_url:
        launcher, pixels = ([policy["step2"], out("step2")], []) if args.deployment_type != "multi_node" else (
            ["step2_trust_grpo/training_scripts/run_multinode.sh", out("step2"), args.hostfile], policy["pixels"])
        commands["step2"] = ["bash", *launcher, args.actor_model, args.registry, args.data_path, trm_url, *pixels]
    if 3 in args.steps:
        for stage, model in (("step3_before", args.actor_model), ("step3_after", out("step2", "final"))):
            commands[stage] = ["bash", "step3_eval/training_scripts/run_qwen2_5_vl_7b.sh", out(stage), model,
                               args.registry, args.eval_data_path, *policy["pixels"]]
    return commands


def gpus(pipeline: Pipeline) -> None:
    """Real scale: the GPU launchers of each stage, one after another."""
    a, out = pipeline.args, pipeline.path
    trm_dir = a.trm_path or out("step1", "final")
    commands = gpu_commands(a, out, trm_url=None)
    if "step1" in commands:
        pipeline.run("step1", commands["step1"], done_when=out("step1", "final", "config.json"))
    if 2 in a.steps:
        max_images = max_images_per_prompt(a.data_path, a.registry)
        with_trm_server(pipeline, trm_dir, max_images, lambda url: pipeline.run(
            "step2", gpu_commands(a, out, url)["step2"] + ["--trm-max-images", str(max_images)],
            done_when=out("step2", "final", "config.json")))
    for stage in ("step3_before", "step3_after"):
        if stage in commands:
            pipeline.run(stage, commands[stage], done_when=out(stage, "summary.json"))


def print_plans(args) -> int:
    """--plan: the launchers of gpus(), with PLAN_ONLY=1, print their memory plans and stop before DeepSpeed."""
    if args.deployment_type == "tiny":
        print("error: --plan plans a GPU deployment (--deployment-type single_gpu, single_node or multi_node)",
              file=sys.stderr)
        return 2
    env = {**os.environ, "PLAN_ONLY": "1", "PYTHON": PYTHON,
           **({"NUM_GPUS": "1"} if args.deployment_type == "single_gpu" else {})}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            commands = gpu_commands(args, lambda *parts: os.path.join(tmp, *parts), trm_url="http://trm.invalid/v1")
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        codes = []
        for stage in ("step1", "step2"):  # step 3 trains nothing: no memory plan
            if stage in commands:
                print(f"[{stage}] {shlex.join(commands[stage])}", flush=True)  # the paths: a temporary folder
                codes.append(subprocess.call(commands[stage], cwd=REPO, env=env))
        return max(codes, default=0)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plan:
        return print_plans(args)
    pipeline = Pipeline(args, REPO)
    start = time.perf_counter()
    # an InputError: step 2's data, read here for the TRM server's image cap
    code = run_stages(lambda: print(json.dumps(tiny(pipeline), indent=2)) if args.deployment_type == "tiny"
                      else gpus(pipeline))
    if code == 0:
        print(f"pipeline finished in {time.perf_counter() - start:.0f} s; outputs in {pipeline.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
