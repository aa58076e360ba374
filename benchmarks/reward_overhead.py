"""Reward overhead: outcome rewards + trust weighting for a step's worth of responses as a share of a step,
and the worst single call of the reward functions over fuzzed strings.

1. A realistic step: --prompts x --num-generations responses (default 128 x 8) of ~300 tokens, the problem
   types mixed, right, wrong and malformed answers (some numerical ones in LaTeX, which go to the sympy
   worker), scored with what step 2 runs each step (step2_trust_grpo.rewards.outcome_rewards, then
   final_rewards with TRM scores, then group_advantages). The sympy worker's start (the first LaTeX answer
   of the process) is timed on its own. The share compares seconds per response with a measured step 2
   step per response: the median step_time of a short one-process run of the tiny job (or --step-metrics),
   the cheapest step there is (a 1.7M-parameter model), so the share at real scale is smaller still.
   Target: < 0.5%.
2. --fuzz strings (default 100,000) through outcome_reward (every problem type), extract_answer and
   parse_score; prints the slowest single calls. No call may be pathological (regex backtracking).

    python benchmarks/reward_overhead.py
    python benchmarks/reward_overhead.py --step-metrics OUT/step2/metrics.jsonl --samples-per-rank 64
    python benchmarks/reward_overhead.py --quick          # CI
"""
import argparse
import functools
import json
import os
import random
import statistics
import tempfile
import time

from step2_trust_grpo.loss import group_advantages
from step2_trust_grpo.rewards import final_rewards, outcome_rewards
from sophiavl.utils.prompts import PROBLEM_TYPES
from sophiavl.utils.outcome_reward import extract_answer, outcome_reward, parse_score

if not __package__:  # run as a script (`python benchmarks/reward_overhead.py`): its sibling grpo_vs_trl is imported
    from sophiavl.utils.stage import stage_package
    __package__ = stage_package(__file__)

WORDS = ("let me think about the chart wait the second bar is taller hmm so we compare the values "
         "oh I see the total is the sum of both parts let's break it down and verify again").split()


# ---------------------------------------------------------------- 1. a realistic step

def realistic_row(rng: random.Random, index: int) -> dict:
    kind = PROBLEM_TYPES[index % len(PROBLEM_TYPES)]
    if kind == "numerical":
        value = rng.randrange(1, 999)
        answer = rng.choice([str(value), f"\\frac{{{2 * value}}}{{2}}"]) if rng.random() < 0.3 else str(value)
        return {"problem_type": kind, "answer": f"<answer>{value}</answer>", "given": answer,
                "wrong": str(value + 1)}
    if kind == "multiple choice":
        letter = rng.choice("ABCD")
        return {"problem_type": kind, "answer": f"<answer>{letter}</answer>", "given": letter,
                "wrong": rng.choice([c for c in "ABCD" if c != letter])}
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 12)))
    return {"problem_type": kind, "answer": f"<answer>{text}</answer>", "given": text,
            "wrong": " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 12)))}


def realistic_step(prompts: int, num_generations: int, response_words: int, seed: int = 0):
    """Rows and responses laid out group by group, as step 2 holds them. ~1.3 tokens a word."""
    rng = random.Random(seed)
    rows, texts = [], []
    for index in range(prompts):
        row = realistic_row(rng, index)
        rows.append(row)
        for _ in range(num_generations):
            think = " ".join(rng.choice(WORDS) for _ in range(response_words))
            roll = rng.random()
            if roll < 0.1:
                texts.append(think)  # no format: gated to 0
            else:
                texts.append(f"<think>{think}</think><answer>{row['given'] if roll < 0.55 else row['wrong']}</answer>")
    return rows, texts


def time_reward_step(rows, texts, num_generations: int, repeats: int) -> dict:
    rng = random.Random(1)
    thinking = [round(rng.random(), 1) for _ in texts]
    start = time.perf_counter()  # the process's first LaTeX answer starts the sympy worker
    outcome_reward("<think>t</think><answer>\\frac{3}{4}</answer>", "0.75", "numerical")
    worker_start = time.perf_counter() - start
    outcome_rewards(texts, rows, num_generations, 4096)  # untimed: imports jiwer / rouge_score, warms caches
    seconds = []
    for repeat in range(repeats):
        start = time.perf_counter()
        outcome = outcome_rewards(texts, rows, num_generations, 4096)
        rewards, _ = final_rewards(outcome, thinking, num_generations, repeat + 1, alpha=0.3, horizon=1500,
                                   use_trust=True, use_anneal=True)
        import torch

        group_advantages(torch.tensor(rewards), num_generations)
        seconds.append(time.perf_counter() - start)
    return {"responses": len(texts), "reward_s": statistics.median(seconds), "reward_s_runs": seconds,
            "us_per_response": statistics.median(seconds) / len(texts) * 1e6, "sympy_worker_start_s": worker_start,
            "mean_outcome": statistics.fmean(outcome), "latex_answers": sum("\\frac" in t for t in texts)}


def measured_step(step_metrics: str | None, samples_per_rank: int | None, warmup: int, quick: bool) -> dict:
    """Median step_time and timing/reward share of a step-2 run: the given metrics.jsonl, or a short
    one-process run of the tiny job (benchmarks/grpo_vs_trl.py's settings for ours)."""
    if step_metrics:
        if not samples_per_rank:
            raise SystemExit("error: --step-metrics needs --samples-per-rank (rollout batch / ranks x N)")
        with open(step_metrics) as f:
            rows = [json.loads(line) for line in f if line.strip()][warmup:]
        source = step_metrics
    else:
        from sophiavl.demo.build_tiny_assets import build

        from . import grpo_vs_trl

        job = argparse.Namespace(prompts=2 if quick else 16, num_generations=4 if quick else 8,
                                 micro_batch_size=4 if quick else 32, max_completion_length=8 if quick else 32,
                                 pixels=12544, steps=3 if quick else 6, seed=0)
        job = grpo_vs_trl.job_settings(job)
        with tempfile.TemporaryDirectory() as tmp:
            assets = build(os.path.join(tmp, "assets"), num_train=60, num_test=4)
            registry = grpo_vs_trl.image_only_registry(assets, os.path.join(tmp, "data"))
            with open(os.path.join(tmp, "ours.log"), "w") as log:
                grpo_vs_trl.run_ours(assets["model"], registry, os.path.join(tmp, "ours"), job, log)
            with open(os.path.join(tmp, "ours", "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f][warmup:]
        samples_per_rank = job["prompts"] * job["num_generations"]
        source = (f"tiny job, 1 process, {job['prompts']} x {job['num_generations']}, "
                  f"{job['max_completion_length']} tokens")
    rows = rows or rows[-1:]
    step_time = statistics.median(r["step_time"] for r in rows)
    return {"source": source, "step_time": step_time, "samples_per_rank": samples_per_rank,
            "ms_per_response": step_time / samples_per_rank * 1e3,
            "reward_share_in_run": statistics.median(r["timing/reward"] / r["step_time"] for r in rows)}


# ---------------------------------------------------------------- 2. fuzzed strings

FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "<answer", "answer>", "</", "<", ">", " ", "\n", "\t",
             "$", "\\frac{", "}", "{", "^", "^{", "\\sqrt{", "\\pi", "\\circ", "(", ")", "*", "**", "/", "=", "x", "y",
             "A", "B", "(C)", "D.", ",", ";", " and ", " or ", "e", "1e", "9", "0", "-", ".", "%", "!", "√", "π",
             "×",
             "é", "中", "\u200b", "\x00", "NaN", "inf", "99999999", "cm", "degree"]


def fuzz_string(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.02:  # long runs of one fragment: where backtracking would show
        return rng.choice(FRAGMENTS) * rng.randrange(1000, 50_000)
    text = "".join(rng.choice(FRAGMENTS) if rng.random() < 0.7 else str(rng.randrange(100))
                   for _ in range(rng.randrange(1, 60)))
    if roll < 0.6:  # mostly well-formed on the outside, so the scorers themselves get the fuzz
        think = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(0, 40)))
        return f"<think>{think}</think><answer>{text}</answer>"
    return text


def shown(text: str) -> str:
    """What a slow call was given: its answer when it has one, else its start."""
    answer = extract_answer(text)
    return ("answer " + repr(answer[:60])) if answer is not None else repr(text[:60])


def fuzz(count: int, seed: int = 0, candidates: int = 5, retime: int = 3) -> dict:
    """Every string through the three functions. The `candidates` slowest inputs of each kind are then
    timed `retime` times more and the slowest of their minimums is reported: a pathological input is slow
    every time, a preemption on this shared machine is not."""
    rng = random.Random(seed)
    total = {"outcome_reward": 0.0, "extract_answer": 0.0, "parse_score": 0.0}
    slowest = {}  # "function / problem type" -> [(seconds, index, call, text)], slowest first
    for index in range(count):
        text = fuzz_string(rng)
        problem_type = PROBLEM_TYPES[index % len(PROBLEM_TYPES)]
        truth = rng.choice(["<answer>5</answer>", "<answer>B</answer>", "\\frac{1}{2}", "STOP AHEAD", "a red car"])
        calls = {f"outcome_reward / {problem_type}": functools.partial(outcome_reward, text, truth, problem_type),
                 "extract_answer": functools.partial(extract_answer, text),
                 "parse_score": functools.partial(parse_score, text)}
        for kind, call in calls.items():
            seconds = timed(call)
            total[kind.split(" /")[0]] += seconds
            kept = slowest.setdefault(kind, [])
            if len(kept) < candidates or seconds > kept[-1][0]:
                kept.append((seconds, index, call, text))
                kept.sort(key=lambda entry: -entry[0])
                del kept[candidates:]
    rows = []
    for kind, kept in sorted(slowest.items()):
        again = [(min(timed(call) for _ in range(retime)), text) for _, _, call, text in kept]
        seconds, text = max(again, key=lambda entry: entry[0])
        rows.append({"kind": kind, "first_pass_max_s": kept[0][0], "confirmed_s": seconds, "chars": len(text),
                     "input": shown(text)})
    return {"strings": count, "total_s": total, "worst": rows}


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def print_fuzz(fuzzed: dict) -> None:
    print(f"\n{fuzzed['strings']} fuzzed strings; total s: " +
          ", ".join(f"{k} {v:.2f}" for k, v in fuzzed["total_s"].items()))
    print(f"{'slowest call of each kind':<34} {'1st pass ms':>11} {'confirmed ms':>13} {'chars':>7}  answer / input")
    for w in fuzzed["worst"]:
        print(f"{w['kind']:<34} {w['first_pass_max_s'] * 1e3:>11.2f} {w['confirmed_s'] * 1e3:>13.2f} {w['chars']:>7}  "
              f"{w['input']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--response-words", type=int, default=230, help="~300 tokens")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--fuzz", type=int, default=100_000, help="fuzzed strings (0: skip)")
    p.add_argument("--step-metrics", default=None, help="metrics.jsonl of a step-2 run to compare with")
    p.add_argument("--samples-per-rank", type=int, default=None, help="with --step-metrics: responses per rank a step")
    p.add_argument("--warmup", type=int, default=2, help="first steps of the step-2 run left out")
    p.add_argument("--fuzz-only", action="store_true", help="only part 2")
    p.add_argument("--quick", action="store_true", help="CI: 8 x 4 responses, 2,000 fuzzed strings, a 3-step run")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.num_generations, args.repeats, args.fuzz, args.warmup = 8, 4, 2, 2000, 1

    if args.fuzz_only:
        fuzzed = fuzz(args.fuzz)
        print(json.dumps({"fuzz": fuzzed}), flush=True)
        print_fuzz(fuzzed)
        return {"fuzz": fuzzed}
    rows, texts = realistic_step(args.prompts, args.num_generations, args.response_words)
    reward = time_reward_step(rows, texts, args.num_generations, args.repeats)
    print(json.dumps({"reward_step": reward}), flush=True)
    step = measured_step(args.step_metrics, args.samples_per_rank, args.warmup, args.quick)
    share = reward["us_per_response"] / 1e3 / step["ms_per_response"]
    print(json.dumps({"step": step, "share": share}), flush=True)
    fuzzed = fuzz(args.fuzz) if args.fuzz else None
    if fuzzed:
        print(json.dumps({"fuzz": fuzzed}), flush=True)

    print(f"\nrewards for {reward['responses']} responses (~{args.response_words} words, {reward['latex_answers']} "
          f"LaTeX): {reward['reward_s'] * 1e3:.1f} ms median of {args.repeats} ({reward['us_per_response']:.1f} us a "
          f"response); sympy worker start {reward['sympy_worker_start_s']:.2f} s (once per process)")
    print(f"step 2 ({step['source']}): {step['step_time']:.3f} s a step, {step['ms_per_response']:.2f} ms a response; "
          f"timing/reward there: {step['reward_share_in_run']:.3%} of the step")
    print(f"reward share of a step per response: {share:.3%} (target < 0.5%)")
    if fuzzed:
        print_fuzz(fuzzed)
    return {"reward": reward, "step": step, "share": share, "fuzz": fuzzed}


if __name__ == "__main__":
    main()
