"""GRPO step time: our step 2 (hf rollout engine) against TRL's GRPOTrainer on the same job.

Same tiny Qwen2.5-VL, same image prompts (the image rows of tiny_train), same group size, completion
length, batch, learning rate, clip, KL and loss aggregation, one CPU process each, and the same DeepSpeed
ZeRO-3 config (utils.ds_config.zero3_train_config; TRL gets it through TrainingArguments(deepspeed=...),
i.e. accelerate's DeepSpeed plugin). Ours: step2_trust_grpo/main.py --variant grpo; its metrics.jsonl
gives timing/{rollout,reward,update,sync} and step_time. TRL: a callback times each optimizer step
(on_step_begin -> on_step_end) and wrappers time its _generate and _calculate_rewards; update = the rest.

    pip install -r benchmarks/requirements.txt          # TRL, pinned
    python benchmarks/grpo_vs_trl.py [--steps 10 --warmup 3]
    python benchmarks/grpo_vs_trl.py --quick            # CI: 3 tiny steps each

"generation" is ours' rollout + weight sync (TRL gathers the ZeRO-3 weights inside its generate).
Prints per-phase medians over the steps after warm-up and ours / TRL; target <= 1.0x, goal <= 0.7x.
"""
import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from sophiavl.utils.pipeline import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("generation", "reward", "update", "step_time")


def single_process_env() -> dict:
    """One-rank torch.distributed without a launcher, as `python step2_trust_grpo/main.py` runs."""
    return {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def image_only_registry(assets: dict, out_dir: str) -> str:
    """A registry with one dataset, bench_images: the tiny_train rows that have an image."""
    with open(assets["train"]) as f:
        rows = [row for row in json.load(f) if row.get("path")]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench_images.json"), "w") as f:
        json.dump(rows, f)
    registry = os.path.join(out_dir, "dataset_info.json")
    with open(registry, "w") as f:
        json.dump({"bench_images": {"file_path": "bench_images.json", "image_base_path": assets["images"],
                                    "columns": {"problem": "prompt", "solution": "answer", "path": "images"}}}, f)
    return registry


def job_settings(args) -> dict:
    samples = args.prompts * args.num_generations
    if samples % args.micro_batch_size:
        raise SystemExit(f"error: {samples} completions per step do not split into micro-batches of "
                         f"{args.micro_batch_size}")
    return dict(prompts=args.prompts, num_generations=args.num_generations, micro_batch_size=args.micro_batch_size,
                accumulation=samples // args.micro_batch_size, max_completion_length=args.max_completion_length,
                pixels=args.pixels, learning_rate=1e-4, kl_coef=0.05, clip_eps=0.2, temperature=1.0,
                steps=args.steps, seed=args.seed)


# ---------------------------------------------------------------- ours

def run_ours(model: str, registry: str, out_dir: str, job: dict, log) -> list[dict]:
    command = [sys.executable, "step2_trust_grpo/main.py", "--model-path", model, "--registry", registry,
               "--data-path", "bench_images", "--output-dir", out_dir, "--rollout-engine", "hf", "--variant", "grpo",
               "--num-generations", str(job["num_generations"]), "--rollout-batch-size", str(job["prompts"]),
               "--micro-batch-size", str(job["micro_batch_size"]),
               "--max-completion-length", str(job["max_completion_length"]), "--max-prompt-length", "512",
               "--min-pixels", str(job["pixels"]), "--max-pixels", str(job["pixels"]), "--dtype", "float32",
               "--learning-rate", str(job["learning_rate"]), "--kl-coef", str(job["kl_coef"]),
               "--clip-eps", str(job["clip_eps"]), "--temperature", str(job["temperature"]),
               "--entropy-coef", "0", "--loss-agg", "token-mean", "--max-steps", str(job["steps"]),
               "--save-every", "0", "--sample-every", "1000000", "--seed", str(job["seed"])]
    subprocess.run(command, cwd=REPO, env=single_process_env(), stdout=log, stderr=subprocess.STDOUT, check=True)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{"generation": r["timing/rollout"] + r["timing/sync"], "reward": r["timing/reward"],
             "update": r["timing/update"], "step_time": r["step_time"],
             "tokens": r["completions/mean_length"] * job["prompts"] * job["num_generations"]} for r in rows]


# ---------------------------------------------------------------- TRL (in its own process: --trl-worker)

def run_trl(model: str, registry: str, out_dir: str, job: dict, log) -> list[dict]:
    job_file = os.path.join(out_dir, "job.json")
    os.makedirs(out_dir, exist_ok=True)
    with open(job_file, "w") as f:
        json.dump({**job, "model": model, "registry": registry, "out_dir": out_dir}, f)
    env = single_process_env()
    try:
        subprocess.run([sys.executable, os.path.abspath(__file__), "--trl-worker", job_file], cwd=REPO,
                       env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    finally:  # DeepSpeed's CPU all-reduce leaves a 69 MB /dev/shm file behind (ours unlinks it: utils.distributed)
        for leftover in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{env['MASTER_PORT']}_*"):
            os.unlink(leftover)
    with open(os.path.join(out_dir, "steps.jsonl")) as f:
        return [json.loads(line) for line in f]


def trl_dataset(job: dict):
    from datasets import Dataset

    from sophiavl.utils.data import load_rows, open_images
    from sophiavl.utils.prompts import policy_messages

    rows = load_rows("bench_images", job["registry"])
    return Dataset.from_list([{"prompt": policy_messages(r["prompt"], r["problem_type"], r["options"], 1),
                               "images": open_images(r), "solution": r["answer"], "problem_type": r["problem_type"]}
                              for r in rows])


def outcome(completions, solution, problem_type, **kwargs) -> list[float]:
    """The same outcome reward as ours (utils.outcome_reward.outcome_reward), as a TRL reward function."""
    from sophiavl.utils.outcome_reward import outcome_reward

    return [outcome_reward(c[0]["content"], s, t) for c, s, t in zip(completions, solution, problem_type)]


def judge_reward(url: str):
    """A TRL reward function that asks the judge at `url` for every completion at once (as our TRM client does)
    and reads the score from its <answer> tag (benchmarks/mid_size.py)."""
    import asyncio
    import re

    import httpx

    async def scores(texts):
        async with httpx.AsyncClient(timeout=60) as client:
            replies = await asyncio.gather(*(client.post(url + "/v1/chat/completions", json={
                "model": "judge", "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]})
                for text in texts))
        return [float(re.search(r"<answer>(.*?)</answer>", r.json()["choices"][0]["message"]["content"])[1])
                for r in replies]

    def judge(completions, **kwargs) -> list[float]:
        return asyncio.run(scores([c[0]["content"] for c in completions]))
    return judge


def trl_worker(job_file: str) -> None:
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from sophiavl.utils.ds_config import zero3_train_config
    from sophiavl.utils.model import load_processor

    with open(job_file) as f:
        job = json.load(f)
    torch.manual_seed(job["seed"])
    ds_config = zero3_train_config(micro_batch_size=job["micro_batch_size"],
                                   gradient_accumulation_steps=job["accumulation"], world_size=1, bf16=False)
    config = GRPOConfig(
        output_dir=job["out_dir"], deepspeed=ds_config, ddp_backend="gloo", bf16=False, fp16=False,
        per_device_train_batch_size=job["micro_batch_size"], gradient_accumulation_steps=job["accumulation"],
        num_generations=job["num_generations"], max_completion_length=job["max_completion_length"],
        temperature=job["temperature"], top_p=1.0, top_k=0, learning_rate=job["learning_rate"],
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, beta=job["kl_coef"],
        epsilon=job["clip_eps"], num_iterations=1, loss_type=job.get("loss_type", "bnpo"), scale_rewards="group",
        reward_weights=[1.0, job["judge_weight"]] if job.get("judge_url") else None,
        gradient_checkpointing=False, max_steps=job["steps"], logging_steps=1, save_strategy="no",
        report_to="none", seed=job["seed"], dataloader_num_workers=0, disable_tqdm=True,
        model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"})
    processor = load_processor(job["model"], job.get("min_pixels", job["pixels"]), job.get("max_pixels", job["pixels"]))
    rewards = [outcome] + ([judge_reward(job["judge_url"])] if job.get("judge_url") else [])
    trainer = GRPOTrainer(model=job["model"], reward_funcs=rewards, args=config, train_dataset=trl_dataset(job),
                          processing_class=processor)

    phase = {"generation": 0.0, "reward": 0.0, "real": 0, "all": 0}
    compute_loss = trainer._compute_loss

    def counting_tokens(model, inputs):  # the training pass's tokens, pads and all (prompt + completion)
        masks = (inputs["prompt_mask"], inputs["completion_mask"])
        phase["real"] += sum(int(m.sum()) for m in masks)
        phase["all"] += sum(m.numel() for m in masks)
        return compute_loss(model, inputs)

    trainer._compute_loss = counting_tokens

    def timed(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phase[name] += time.perf_counter() - start
        return wrapper

    trainer._generate = timed("generation", trainer._generate)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    steps_path = os.path.join(job["out_dir"], "steps.jsonl")

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            phase.update(generation=0.0, reward=0.0, real=0, all=0, start=time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            step_time = time.perf_counter() - phase["start"]
            tokens = trainer._metrics["train"]["completions/mean_length"][-1] * job["prompts"] * job["num_generations"]
            with open(steps_path, "a") as f:
                f.write(json.dumps({"generation": phase["generation"], "reward": phase["reward"],
                                    "update": step_time - phase["generation"] - phase["reward"],
                                    "step_time": step_time, "tokens": tokens, "update_tokens": phase["real"],
                                    "padding": 1 - phase["real"] / max(phase["all"], 1),
                                    "mean_length": tokens / job["prompts"] / job["num_generations"]}) + "\n")

    trainer.add_callback(StepTimer())
    trainer.train()


# ---------------------------------------------------------------- comparison

def medians(steps: list[dict], warmup: int) -> dict:
    kept = steps[warmup:] or steps[-1:]
    result = {p: statistics.median(s[p] for s in kept) for p in PHASES}
    result["tokens_per_s"] = statistics.median(s["tokens"] / s["generation"] for s in kept)
    result["steps_measured"] = len(kept)
    return result


def main(argv=None):
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--trl-worker":
        return trl_worker(sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--assets", default=None, help="tiny assets folder (default: built in a temporary folder)")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=32)
    p.add_argument("--max-completion-length", type=int, default=32)
    p.add_argument("--pixels", type=int, default=12544, help="min = max pixels per image (112x112: 16 tokens)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the medians")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["ours", "trl"], default=None)
    p.add_argument("--keep", default=None, help="keep logs and metrics in this folder")
    p.add_argument("--quick", action="store_true", help="CI: 2 prompts x 4, 8 tokens, 3 steps (1 warm-up)")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.num_generations, args.micro_batch_size = 2, 4, 4
        args.max_completion_length, args.steps, args.warmup = 8, 3, 1
    job = job_settings(args)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or tmp
        os.makedirs(work, exist_ok=True)
        from sophiavl.demo.build_tiny_assets import asset_paths, build

        assets = asset_paths(args.assets) if args.assets else build(os.path.join(work, "assets"), num_train=60,
                                                                    num_test=4)
        registry = image_only_registry(assets, os.path.join(work, "data"))
        results = {}
        for name, runner in (("ours", run_ours), ("trl", run_trl)):
            if args.only and args.only != name:
                continue
            log_path = os.path.join(work, f"{name}.log")
            with open(log_path, "w") as log:
                try:
                    steps = runner(assets["model"], registry, os.path.join(work, name), job, log)
                except subprocess.CalledProcessError:
                    with open(log_path, errors="replace") as f:
                        print(f.read()[-4000:], file=sys.stderr)
                    raise
            results[name] = {"steps": steps, "median": medians(steps, args.warmup)}
            print(json.dumps({"run": name, **results[name]["median"]}), flush=True)
    report(results, job)
    return results


def report(results: dict, job: dict) -> None:
    print(f"\njob: {job['prompts']} prompts x {job['num_generations']} samples, {job['max_completion_length']} new "
          f"tokens, micro-batch {job['micro_batch_size']}, ZeRO-3, 1 CPU process; medians after warm-up (s)")
    names = list(results)
    print(f"{'phase':<14}" + "".join(f"{n:>10}" for n in names) + ("  ours/TRL" if len(names) == 2 else ""))
    for phase in PHASES + ("tokens_per_s",):
        values = [results[n]["median"][phase] for n in names]
        ratio = f"{values[0] / values[1]:>9.2f}x" if len(values) == 2 and values[1] else ""
        print(f"{phase:<14}" + "".join(f"{v:>10.3f}" for v in values) + ratio)


if __name__ == "__main__":
    main()
