"""Step 3: evaluate a policy on registry datasets and VLMEvalKit benchmark TSVs with greedy decoding.

    python step3_eval/main.py --model-path M --data-path tiny_test --registry data/dataset_info.json --output-dir OUT
    python step3_eval/main.py --model-path M --benchmark-tsv LMUData/MMBench_DEV_EN.tsv,LMUData/MME.tsv --output-dir OUT
    deepspeed --num_gpus 8 step3_eval/main.py ...   # rows sharded across ranks, merged in input order

Scores are rule-based (utils.outcome_reward); MME and ChartQA also get their official metric (step3_eval/metrics.py).

Each rank holds a full copy of the model (evaluation needs no ZeRO sharding: a 7B model fits one
GPU, and sharded generation would need synced_gpus, which is much slower).
"""
import argparse
import json
import logging
import os
import re
from collections import defaultdict

import torch
from tqdm import tqdm

from sophiavl.utils.arguments import add_distributed_arguments, add_model_arguments, check_shared_args
from sophiavl.utils.cli import InputError, exit_on_input_error
from sophiavl.utils.data import load_registry, load_rows, open_images
from sophiavl.utils.distributed import init_distributed, shutdown
from sophiavl.utils.prompt_length import sharded_prompt_lengths
from sophiavl.utils.prompts import policy_messages
from sophiavl.utils.outcome_reward import extract_answer, has_think_answer_format, outcome_reward
from sophiavl.utils.outputs import prepare_output_dir, write_atomic, write_run_info

if not __package__:  # run as a script (`deepspeed step3_eval/main.py`, or a copy of the folder)
    from sophiavl.utils.stage import stage_package
    __package__ = stage_package(__file__)

from .metrics import benchmark_summary, scores_csv
from .skipped import default_max_prompt_length, over_long, skipped_prediction, skipped_summary
from .vlmeval_tsv import read_vlmeval_tsv, result_tsv


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", required=True, help="HF model directory (e.g. step 2's final policy)")
    parser.add_argument("--data-path", help="registry name(s), comma-separated: tiny_test,Chart")
    parser.add_argument("--registry", help="dataset_info.json that registers the names (a .tsv file_path is read "
                        "as a VLMEvalKit TSV)")
    parser.add_argument("--benchmark-tsv", action="append", default=[],
                        help="VLMEvalKit benchmark TSV(s), repeatable or comma-separated: MMBench_DEV_EN.tsv,MME.tsv")
    parser.add_argument("--benchmark-name", action="append", default=[],
                        help="name per --benchmark-tsv, in order (default: the file name without .tsv); "
                        "MME and ChartQA* get their official metrics")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--prompt-template", choices=["eval", "train"], default="eval",
                        help="eval: the paper's evaluation system prompt; train: the policy training template")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (per rank)")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N rows")
    add_model_arguments(parser, pixels=(None, None), training=False)  # --attn-implementation: the hf backend's
    parser.add_argument("--max-model-len", type=int, default=8192, help="vllm backend: context length")
    parser.add_argument("--max-prompt-length", type=int, default=None,
                        help="longer prompts (tokens, images included) are skipped: scored 0 and listed (default: "
                        "the context, --max-model-len or the model's max_position_embeddings, less --max-new-tokens)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vllm backend")
    parser.add_argument("--max-answer-chars", type=int, default=4096, help="longer answers score 0")
    parser.add_argument("--strict-format", action="store_true",
                        help="score only replies with nothing but whitespace between </think> and <answer> and "
                        "nothing after the last </answer>, which is the one read (default: the reference's gate, "
                        "the first answer)")
    parser.add_argument("--seed", type=int, default=0)
    add_distributed_arguments(parser)
    args = parser.parse_args(argv)
    args.benchmark_tsv = [os.path.expanduser(path.strip()) for value in args.benchmark_tsv
                          for path in value.split(",") if path.strip()]
    names = [name.strip() for value in args.benchmark_name for name in value.split(",") if name.strip()]
    args.benchmark_name = names or [os.path.splitext(os.path.basename(path))[0] for path in args.benchmark_tsv]
    args.data_names = [name.strip() for name in (args.data_path or "").split(",") if name.strip()]
    return args


def check_args(args) -> None:
    """The flags and their combinations, checked before anything is read."""
    check_shared_args(args)
    for flag in ("batch_size", "max_new_tokens", "max_model_len", "max_answer_chars", "max_prompt_length",
                 "max_samples"):
        if getattr(args, flag) is not None and not getattr(args, flag) > 0:  # "not > 0" also rejects nan
            raise InputError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if len(args.benchmark_name) != len(args.benchmark_tsv):  # the default names are one per file
        raise InputError(f"--benchmark-name gives {len(args.benchmark_name)} names for {len(args.benchmark_tsv)} "
                         f"--benchmark-tsv files")
    if not args.data_names and not args.benchmark_tsv:
        raise InputError("nothing to evaluate: give --data-path (with --registry) or --benchmark-tsv")
    if args.data_names and not args.registry:
        raise InputError("--data-path needs --registry")
    for name in args.benchmark_name:
        if not re.fullmatch(r"[\w.+-]+", name):  # it names the output file NAME_predictions.tsv
            raise InputError(f"--benchmark-name {name!r}: use letters, digits and . _ + - only")
    all_names = args.data_names + args.benchmark_name
    if len(set(all_names)) != len(all_names):
        raise InputError(f"dataset names repeat across --data-path and --benchmark-name: {', '.join(all_names)}")


def load_eval_rows(args) -> list:
    """--data-path names in order (a registry entry whose file is a .tsv read as a VLMEvalKit TSV), then the TSVs."""
    rows = []
    registry = load_registry(args.registry) if args.data_names else {}
    for name in args.data_names:
        entry = registry.get(name)
        if entry and entry["file_path"].lower().endswith(".tsv"):
            rows += read_vlmeval_tsv(entry["file_path"], name, entry["image_base_path"])
        else:
            rows += load_rows(name, args.registry)
    for path, name in zip(args.benchmark_tsv, args.benchmark_name):
        rows += read_vlmeval_tsv(path, name)
    return rows


def build_generator(args, rank: int, max_images: int):
    """(generate, close): generate maps (list of chats, list of image lists) to completion texts; close releases
    the engine before the process group goes (utils.distributed.shutdown). Both backends decode
    greedily with no repetition penalty (VLMEvalKit's setting), whatever the checkpoint's generation_config.json
    says, from images resized once by the processor's rule (utils.vision), so they agree token for token."""
    from sophiavl.utils.generation import Sampling
    from sophiavl.utils.model import load_processor, resolve_dtype
    from sophiavl.utils.prompts import POLICY_THINKING
    from sophiavl.utils.vision import resize_images

    processor = load_processor(args.model_path, args.min_pixels, args.max_pixels)
    dtype = resolve_dtype(args.dtype)
    greedy = Sampling(max_new_tokens=args.max_new_tokens)
    if args.backend == "vllm":
        from sophiavl.utils.generation import build_vllm, close_vllm, vllm_generate, vllm_sampling_params, vllm_texts

        llm = build_vllm(
            args.model_path, processor, dtype=str(dtype).removeprefix("torch."), max_model_len=args.max_model_len,
            max_images=max_images, seed=args.seed, gpu_memory_utilization=args.gpu_memory_utilization,
            colocated=torch.distributed.is_initialized(),
        )
        params = vllm_sampling_params(processor, greedy)
        return (lambda chats, images: [texts[0] for texts in vllm_texts(processor, vllm_generate(
            llm, processor, chats, [resize_images(i, processor) for i in images], params,
            enable_thinking=POLICY_THINKING))]), lambda: close_vllm(llm)

    from sophiavl.utils.generation import hf_generate
    from sophiavl.utils.model import load_model

    model = load_model(args.model_path, dtype, args.attn_implementation).eval()
    if torch.cuda.is_available():
        model.to(f"cuda:{torch.cuda.current_device()}")
    return (lambda chats, images: hf_generate(model, processor, chats, [resize_images(i, processor) for i in images],
                                              greedy, enable_thinking=POLICY_THINKING)[0]), lambda: None


def eval_chat(row: dict, num_images: int, args) -> list:
    return policy_messages(row["prompt"], row["problem_type"], row["options"], num_images=num_images,
                           template=args.prompt_template, hint=row.get("hint"))


def evaluate_shard(rows: list, indices: list, generate, args, show_progress: bool, skipped: dict) -> list:
    """Predictions of the rows at `indices`. `skipped` ({index: reason}, the over-long prompts) gains the rows
    whose images fail to decode; each skipped row gets its scored-0 line (step3_eval/skipped.py)."""
    predictions = []
    batches = [indices[i:i + args.batch_size] for i in range(0, len(indices), args.batch_size)]
    for batch in tqdm(batches, desc="evaluating", unit="batch", disable=not show_progress):
        usable, images = [], []
        for i in (i for i in batch if i not in skipped):
            try:
                images.append(open_images(rows[i]))
                usable.append(i)
            except InputError as err:  # e.g. a JPEG cut short inside its pixel data: verify() passed it at load
                skipped[i] = f"unreadable image: {err}"
                logging.getLogger(__name__).warning("%s; the row is skipped (scored 0)", err)
        predictions += [skipped_prediction(i, rows[i], skipped[i]) for i in batch if i in skipped]
        chats = [eval_chat(rows[i], len(imgs), args) for i, imgs in zip(usable, images)]
        for i, completion in zip(usable, generate(chats, images) if usable else []):
            row = rows[i]
            predictions.append({
                "index": i,
                "id": row["id"],
                "dataset": row["dataset"],
                "problem_type": row["problem_type"],
                "prompt": row["prompt"],
                "answer": row["answer"],
                "prediction": completion,
                "extracted": extract_answer(completion, last=args.strict_format),
                "score": outcome_reward(completion, row["answer"], row["problem_type"],
                                        max_answer_chars=args.max_answer_chars, strict_format=args.strict_format),
            })
    return predictions


def gather_in_input_order(predictions: list, world_size: int) -> list:
    if world_size > 1:
        shards = [None] * world_size
        torch.distributed.all_gather_object(shards, predictions)
        predictions = [p for shard in shards for p in shard]
    return sorted(predictions, key=lambda p: p["index"])


def summarize(predictions: list, strict_format: bool = False) -> dict:
    def mean_by(key):
        groups = defaultdict(list)
        for p in predictions:
            groups[p[key]].append(p["score"])
        return {name: {"score": sum(s) / len(s), "count": len(s)} for name, s in sorted(groups.items())}

    scores = [p["score"] for p in predictions]
    return {
        "overall": {"score": sum(scores) / len(scores), "count": len(scores)},
        "by_problem_type": mean_by("problem_type"),
        "by_dataset": mean_by("dataset"),
        # the format outcome_reward gates on (<think>...</think> ... <answer>...</answer>), not just an <answer> tag
        "format_ok": sum(has_think_answer_format(p["prediction"].replace("$", ""), strict=strict_format)
                         for p in predictions) / len(predictions),
    }


def report_benchmarks(rows: list, predictions: list, args) -> dict:
    """Score each benchmark read from a TSV with its metric; write NAME_predictions.tsv and scores.csv beside."""
    benchmarks = {}
    for name in dict.fromkeys(row["dataset"] for row in rows if "source" in row):
        picked = [k for k, row in enumerate(rows) if row["dataset"] == name]
        bench_rows, bench_predictions = [rows[k] for k in picked], [predictions[k] for k in picked]
        benchmarks[name], scores = benchmark_summary(name, bench_rows, bench_predictions, args.max_answer_chars,
                                                     args.strict_format)
        write_atomic(os.path.join(args.output_dir, f"{name}_predictions.tsv"),
                     result_tsv(bench_rows, bench_predictions, scores))
    if benchmarks:
        write_atomic(os.path.join(args.output_dir, "scores.csv"), scores_csv(benchmarks))
    return benchmarks


def print_table(summary: dict) -> None:
    print(f"{'group':<32}{'score':>8}{'count':>8}")
    for name, entry in summary["benchmarks"].items():
        shown = entry["score"] if entry["metric"].startswith("MME") else 100 * entry["score"]  # MME: out of 2800
        print(f"{name:<32}{shown:>8.1f}{entry['count']:>8}  {entry['metric']}")
    for section in ("by_dataset", "by_problem_type"):
        for name, entry in summary[section].items():
            print(f"{name:<32}{100 * entry['score']:>8.1f}{entry['count']:>8}")
    overall = summary["overall"]
    print(f"{'overall':<32}{100 * overall['score']:>8.1f}{overall['count']:>8}")
    if summary["skipped"]["count"]:
        print(f"{summary['skipped']['count']} rows skipped (over-long or unreadable), scored 0: see summary.json")


def over_long_rows(args, rows: list, rank: int) -> dict:
    """{row index: reason} for the prompts over --max-prompt-length, measured as the model will see them."""
    from sophiavl.utils.model import load_processor

    processor = load_processor(args.model_path, args.min_pixels, args.max_pixels)
    max_length = args.max_prompt_length or default_max_prompt_length(args)
    lengths = sharded_prompt_lengths(processor, rows, lambda row: eval_chat(row, len(row["images"]), args), max_length)
    return over_long(rows, lengths, max_length, log=rank == 0)


@exit_on_input_error
def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    rank, world_size = init_distributed(args.dist_timeout_minutes, single_process_group=False)  # ranks under the deepspeed launcher
    # rows first: a bad registry, dataset name or TSV must not leave a half-made output directory behind
    rows = load_eval_rows(args)[: args.max_samples]
    if rank == 0:
        prepare_output_dir(args.output_dir)
        write_run_info(args.output_dir, args)
    skipped = over_long_rows(args, rows, rank)
    max_images = max(len(row["images"]) for row in rows)
    generate, close = build_generator(args, rank, max_images)
    predictions = evaluate_shard(rows, list(range(rank, len(rows), world_size)), generate, args, rank == 0, skipped)
    predictions = gather_in_input_order(predictions, world_size)
    if rank == 0:
        write_results(args, rows, predictions)
    if world_size > 1:
        shutdown(close)


def write_results(args, rows: list, predictions: list) -> None:
    summary = summarize(predictions, args.strict_format)
    summary["benchmarks"] = report_benchmarks(rows, predictions, args)
    summary["skipped"] = skipped_summary(predictions)
    summary.update(model_path=args.model_path, data_path=args.data_path, benchmark_tsv=args.benchmark_tsv,
                   prompt_template=args.prompt_template, backend=args.backend, strict_format=args.strict_format)
    lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
    write_atomic(os.path.join(args.output_dir, "predictions.jsonl"), lines)
    write_atomic(os.path.join(args.output_dir, "summary.json"), json.dumps(summary, indent=2))
    print_table(summary)


if __name__ == "__main__":
    main()
