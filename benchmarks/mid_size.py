"""Step time at a mid-size shape: our step 2 with its speed features, each switched off once, against TRL's
GRPOTrainer on the same job (issue 18's benchmark; benchmarks/RESULTS.md has the figures).

The model: a random-init Qwen2.5-VL with the release's files and Qwen2.5's real vocabulary
(demo/real_shaped_model.py: 152,064 rows, untied) at a width where the matmuls, not fixed costs, fill a step here
(--hidden, --layers); its <|im_end|> row of lm_head is set so that sampling at temperature 1 stops after about
--mean-length tokens, so completions spread widely (capped at --max-completion-length) as real rollouts do.
The prompts carry images of several sizes (--image-sizes), resized by the Qwen rule within --min/--max-pixels.
The judge answers after --judge-latency seconds (benchmarks/trm_throughput.py's fixed-latency server).

Arms, one process each, the same job, seed and ZeRO-3 config (utils.ds_config.zero3_train_config):
    ours          Trust-GRPO, --max-tokens-per-micro-batch, --trm-overlap, --loss-agg token-mean-global
    no-budget     ours with fixed micro-batches of --micro-batch-size completions
    no-overlap    ours with --no-trm-overlap (the judge is awaited before the update)
    trl           TRL's GRPOTrainer: transformers generation, loss_type "dapo" (the step-global token mean),
                  reward = outcome + 0.3 x the judge's score, both as reward functions; no gradient checkpointing
Reported per arm (medians after --warmup steps): step time and its phases, padding share (pad tokens / all tokens
of the update's passes, prompt and completion), the judge's remaining wait as a share of the step, and the update's
achieved FLOP/s (update_flops: 8 per matrix parameter per real token, the training pass's 6 and the reference
pass's 2, lm_head over completion tokens only; attention scores and the small vision tower left out) against this machine's fp32 matmul rate measured here.

    python benchmarks/mid_size.py                      # the table of benchmarks/RESULTS.md (~30 min here)
    python benchmarks/mid_size.py --quick --arms ours,no-overlap   # CI: a narrow model, 2 steps
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

if not __package__:  # run as a script (`python benchmarks/mid_size.py`): its siblings are imported
    from sophiavl.utils.stage import stage_package
    __package__ = stage_package(__file__)

from . import grpo_vs_trl, trm_throughput

ARMS = ("ours", "no-budget", "no-overlap", "trl")
ARM_FLAGS = {"ours": [], "no-budget": ["--max-tokens-per-micro-batch", "0"], "no-overlap": ["--no-trm-overlap"]}


# ---------------------------------------------------------------- the model and the data

def build_model(out_dir: str, hidden: int, layers: int, mean_length: int, seed: int = 0) -> dict:
    """The real-shaped Qwen2.5-VL (release files, real vocabulary) at `hidden` x `layers`, its stop row tuned.
    Returns {"path", "layer_params" (the decoder layers' matrices), "head_params" (lm_head's), "stop_scale"}."""
    from sophiavl.demo.real_shaped_model import IM_END, build_real_shaped, make_model, write_json

    build_real_shaped(out_dir, tied=False, seed=seed)
    with open(os.path.join(out_dir, "config.json")) as f:
        config = json.load(f)
    heads = max(hidden // 64, 1)
    widths = dict(hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 64 * 64, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1))
    mrope = {"type": "mrope", "mrope_section": [8, 12, 12]}  # head_dim 64: halves summing to 32 (7B: 16, 24, 24)
    for section in (config, config["text_config"]):
        section.update(widths, rope_scaling=mrope)
        section.pop("layer_types", None)
    config["vision_config"]["out_hidden_size"] = hidden
    model = make_model(config, seed)
    scale = tune_stop_row(model, IM_END, 1 / mean_length)
    model.save_pretrained(out_dir)
    write_json(os.path.join(out_dir, "config.json"), config)
    layers = sum(p.numel() for p in model.model.language_model.layers.parameters() if p.dim() == 2)
    return {"path": out_dir, "layer_params": layers, "head_params": model.lm_head.weight.numel(), "stop_scale": scale}


def tune_stop_row(model, stop_id: int, rate: float) -> float:
    """Point lm_head's `stop_id` row along the mean direction of the final hidden states, scaled so that the stop
    token's probability at temperature 1 is `rate` at the median position of a random token sequence."""
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        ids = torch.randint(0, 150_000, (4, 64))
        hidden = model.model.language_model(input_ids=ids).last_hidden_state.reshape(-1, model.lm_head.in_features)
        direction = hidden.mean(dim=0)
        direction /= direction.norm()
        logits = model.lm_head(hidden)
        logits[:, stop_id] = -math.inf
        wanted = torch.logsumexp(logits, dim=-1) + math.log(rate / (1 - rate))  # the stop logit giving `rate`
        scale = (wanted / (hidden @ direction)).median().item()
        model.lm_head.weight[stop_id] = scale * direction
    return scale


def image_registry(assets: dict, out_dir: str, sizes: list) -> str:
    """bench_images (grpo_vs_trl.image_only_registry) with each row's image resized to the next of `sizes`."""
    from PIL import Image

    registry = grpo_vs_trl.image_only_registry(assets, out_dir)
    with open(os.path.join(out_dir, "bench_images.json")) as f:
        rows = json.load(f)
    images = os.path.join(out_dir, "images")
    os.makedirs(images, exist_ok=True)
    for k, row in enumerate(rows):
        width, height = sizes[k % len(sizes)]
        name = f"{k}_{width}x{height}.png"
        Image.open(os.path.join(assets["images"], row["path"])).convert("RGB").resize((width, height)).save(
            os.path.join(images, name))
        row["path"] = name
    with open(os.path.join(out_dir, "bench_images.json"), "w") as f:
        json.dump(rows, f)
    with open(registry) as f:
        info = json.load(f)
    info["bench_images"]["image_base_path"] = images
    with open(registry, "w") as f:
        json.dump(info, f)
    return registry


def matmul_flops_per_s(size: int = 1024, seconds: float = 3.0) -> float:
    """This machine's fp32 matmul rate with the threads the runs get (OMP_NUM_THREADS)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size ** 3 * count / (time.perf_counter() - start)


# ---------------------------------------------------------------- the runs

def run_ours(arm: str, model: str, registry: str, judge: str, out_dir: str, job: dict, log) -> list[dict]:
    command = [sys.executable, "step2_trust_grpo/main.py", "--model-path", model, "--registry", registry,
               "--data-path", "bench_images", "--output-dir", out_dir, "--rollout-engine", "hf", "--variant", "full",
               "--trm-url", judge, "--num-generations", str(job["num_generations"]),
               "--rollout-batch-size", str(job["prompts"]), "--micro-batch-size", str(job["micro_batch_size"]),
               "--max-tokens-per-micro-batch", str(job["token_budget"]), "--loss-agg", "token-mean-global",
               "--max-completion-length", str(job["max_completion_length"]), "--max-prompt-length", "2048",
               "--min-pixels", str(job["min_pixels"]), "--max-pixels", str(job["max_pixels"]), "--dtype", "float32",
               "--learning-rate", str(job["learning_rate"]), "--kl-coef", str(job["kl_coef"]),
               "--clip-eps", str(job["clip_eps"]), "--temperature", str(job["temperature"]),
               "--top-p", "1.0", "--top-k", "0", "--entropy-coef", "0", "--max-steps", str(job["steps"]),
               "--save-every", "0", "--sample-every", "1000000", "--seed", "0", *ARM_FLAGS[arm]]
    subprocess.run(command, cwd=grpo_vs_trl.REPO, env=grpo_vs_trl.single_process_env(), stdout=log,
                   stderr=subprocess.STDOUT, check=True)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{"generation": r["timing/rollout"] + r["timing/sync"], "reward": r["timing/reward"],
             "update": r["timing/update"], "step_time": r["step_time"], "padding": r["update/padding_share"],
             "update_tokens": r["update/tokens"], "mean_length": r["completions/mean_length"]} for r in rows]


def update_flops(step: dict, model: dict, samples: int) -> float:
    """The update's matmul FLOPs: the training pass (6 per parameter per token) and the reference pass (2); the
    decoder layers see every real token, lm_head only the completions' (both trainers compute no prompt logits)."""
    return 8 * (model["layer_params"] * step["update_tokens"] + model["head_params"] * step["mean_length"] * samples)


def summarize(steps: list[dict], warmup: int, model: dict, samples: int, peak: float) -> dict:
    kept = steps[warmup:] or steps[-1:]
    median = lambda key: statistics.median(s[key] for s in kept)  # noqa: E731
    flops = statistics.median(update_flops(s, model, samples) / s["update"] for s in kept)
    return {"step_time": median("step_time"), "generation": median("generation"), "reward": median("reward"),
            "update": median("update"), "padding": median("padding"), "mean_length": median("mean_length"),
            "judge_wait_share": statistics.median(s["reward"] / s["step_time"] for s in kept),
            "update_gflops": flops / 1e9, "update_share_of_matmul_peak": flops / peak,
            "steps_measured": len(kept)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--mean-length", type=int, default=120, help="completion tokens at which sampling stops on average")
    p.add_argument("--max-completion-length", type=int, default=400)
    p.add_argument("--image-sizes", default="224x224,448x336,336x672,112x112")
    p.add_argument("--min-pixels", type=int, default=3136)
    p.add_argument("--max-pixels", type=int, default=200704, help="256 image tokens at most")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--token-budget", type=int, default=4096, help="ours: --max-tokens-per-micro-batch")
    p.add_argument("--judge-latency", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--keep", default=None, help="keep the model, logs and metrics in this folder")
    p.add_argument("--quick", action="store_true", help="CI: hidden 128, 1 layer, 2 prompts x 4, 24 tokens, 2 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.mean_length, args.max_completion_length = 128, 1, 12, 24
        args.prompts, args.num_generations, args.micro_batch_size, args.token_budget = 2, 4, 4, 1024
        args.steps, args.warmup, args.image_sizes, args.judge_latency = 2, 1, "112x112,224x112", 0.05
    arms = args.arms.split(",")
    if set(arms) - set(ARMS):
        raise SystemExit(f"error: --arms: unknown {sorted(set(arms) - set(ARMS))}; choose from {', '.join(ARMS)}")
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.image_sizes.split(",")]
    job = grpo_vs_trl.job_settings(argparse.Namespace(pixels=None, seed=0, **{k: getattr(args, k) for k in (
        "prompts", "num_generations", "micro_batch_size", "max_completion_length", "steps")}))
    job.update(token_budget=args.token_budget, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
               loss_type="dapo", judge_weight=0.3)  # TRL's "dapo": the step-global token mean, as ours

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or tmp
        os.makedirs(work, exist_ok=True)
        from sophiavl.demo.build_tiny_assets import build

        assets = build(os.path.join(work, "assets"), num_train=40, num_test=4)
        registry = image_registry(assets, os.path.join(work, "data"), sizes)
        model = build_model(os.path.join(work, "model"), args.hidden, args.layers, args.mean_length)
        peak = matmul_flops_per_s()
        print(json.dumps({**model, "matmul_gflops": peak / 1e9}), flush=True)
        judge_process, judge = trm_throughput.start_fixed_latency_judge(args.judge_latency, capacity=256)
        results = {}
        try:
            for arm in arms:
                with open(os.path.join(work, f"{arm}.log"), "w") as log:
                    if arm == "trl":
                        steps = grpo_vs_trl.run_trl(model["path"], registry, os.path.join(work, arm),
                                                    {**job, "judge_url": judge}, log)
                    else:
                        steps = run_ours(arm, model["path"], registry, judge, os.path.join(work, arm), job, log)
                results[arm] = summarize(steps, args.warmup, model, args.prompts * args.num_generations, peak)
                print(json.dumps({"arm": arm, **results[arm]}), flush=True)
        finally:
            judge_process.terminate()
            judge_process.wait(timeout=10)
    report(results, args, peak)
    return results


def report(results: dict, args, peak: float) -> None:
    print(f"\n{args.prompts} prompts x {args.num_generations}, hidden {args.hidden} x {args.layers} layers, "
          f"real vocabulary, completions <= {args.max_completion_length} tokens, judge {args.judge_latency} s; "
          f"medians after {args.warmup} warm-up step(s); matmul peak {peak / 1e9:.1f} GFLOP/s")
    columns = ("step_time", "generation", "reward", "update", "padding", "judge_wait_share", "update_gflops",
               "update_share_of_matmul_peak", "mean_length")
    print(f"{'arm':<12}" + "".join(f"{c[:14]:>15}" for c in columns))
    for arm, row in results.items():
        print(f"{arm:<12}" + "".join(f"{row[c]:>15.3f}" for c in columns))


if __name__ == "__main__":
    main()
