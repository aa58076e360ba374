"""Step 3: evaluate a policy on registry datasets with greedy decoding and rule-based scores.

    python step3_eval/main.py --model-path M --data-path tiny_test --registry data/dataset_info.json --output-dir OUT
    deepspeed --num_gpus 8 step3_eval/main.py ...   # rows sharded across ranks, merged in input order

Each rank holds a full copy of the model (evaluation needs no ZeRO sharding: a 7B model fits one
GPU, and sharded generation would need synced_gpus, which is much slower).
"""
import argparse
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from tqdm import tqdm

from utils.cli import InputError, exit_on_input_error
from utils.data import load_rows, open_images
from utils.prompts import policy_messages
from utils.rewards import extract_answer, has_think_answer_format, outcome_reward
from utils.outputs import prepare_output_dir, write_atomic, write_run_info


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", required=True, help="HF model directory (e.g. step 2's final policy)")
    parser.add_argument("--data-path", required=True, help="registry name(s), comma-separated: tiny_test,Chart")
    parser.add_argument("--registry", required=True, help="dataset_info.json that registers the names")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--prompt-template", choices=["eval", "train"], default="eval",
                        help="eval: the paper's evaluation system prompt; train: the policy training template")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (per rank)")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N rows")
    parser.add_argument("--min-pixels", type=int, default=None)
    parser.add_argument("--max-pixels", type=int, default=None)
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    parser.add_argument("--attn-implementation", default="sdpa", help="sdpa, or flash_attention_2 on GPUs")
    parser.add_argument("--max-model-len", type=int, default=8192, help="vllm backend: context length")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vllm backend")
    parser.add_argument("--max-answer-chars", type=int, default=4096, help="longer answers score 0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = parser.parse_args(argv)
    for flag in ("batch_size", "max_new_tokens", "max_model_len", "max_answer_chars"):
        if getattr(args, flag) <= 0:
            raise InputError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.max_samples is not None and args.max_samples <= 0:
        raise InputError(f"--max-samples must be positive, got {args.max_samples}")
    return args


def init_distributed() -> tuple[int, int]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not torch.distributed.is_initialized():
        import datetime

        import deepspeed

        deepspeed.init_distributed(timeout=datetime.timedelta(minutes=30))
    rank = torch.distributed.get_rank() if world_size > 1 else 0
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return rank, world_size


def build_generator(args, rank: int, max_images: int):
    """A function: (list of chats, list of image lists) -> list of completion texts."""
    from utils.model import load_processor, resolve_dtype

    processor = load_processor(args.model_path, args.min_pixels, args.max_pixels)
    dtype = resolve_dtype(args.dtype)
    if args.backend == "vllm":
        from utils.generation import build_vllm, vllm_generate, vllm_sampling_params

        llm = build_vllm(
            args.model_path, dtype=str(dtype).removeprefix("torch."), max_model_len=args.max_model_len,
            max_images=max_images, seed=args.seed, gpu_memory_utilization=args.gpu_memory_utilization,
            colocated=torch.distributed.is_initialized(),
        )
        greedy = vllm_sampling_params(processor, temperature=0.0, max_tokens=args.max_new_tokens)
        return lambda chats, images: [out.outputs[0].text for out in vllm_generate(llm, processor, chats, images, greedy)]

    from utils.generation import hf_generate
    from utils.model import load_model

    model = load_model(args.model_path, dtype, args.attn_implementation).eval()
    if torch.cuda.is_available():
        model.to(f"cuda:{torch.cuda.current_device()}")
    return lambda chats, images: hf_generate(model, processor, chats, images, max_new_tokens=args.max_new_tokens)[0]


def evaluate_shard(rows: list, indices: list, generate, args, show_progress: bool) -> list:
    predictions = []
    batches = [indices[i:i + args.batch_size] for i in range(0, len(indices), args.batch_size)]
    for batch in tqdm(batches, desc="evaluating", unit="batch", disable=not show_progress):
        images = [open_images(rows[i]) for i in batch]
        chats = [
            policy_messages(rows[i]["prompt"], rows[i]["problem_type"], rows[i]["options"], num_images=len(imgs),
                            template=args.prompt_template)
            for i, imgs in zip(batch, images)
        ]
        for i, completion in zip(batch, generate(chats, images)):
            row = rows[i]
            predictions.append({
                "index": i,
                "id": row["id"],
                "dataset": row["dataset"],
                "problem_type": row["problem_type"],
                "prompt": row["prompt"],
                "answer": row["answer"],
                "prediction": completion,
                "extracted": extract_answer(completion),
                "score": outcome_reward(completion, row["answer"], row["problem_type"],
                                        max_answer_chars=args.max_answer_chars),
            })
    return predictions


def gather_in_input_order(predictions: list, world_size: int) -> list:
    if world_size > 1:
        shards = [None] * world_size
        torch.distributed.all_gather_object(shards, predictions)
        predictions = [p for shard in shards for p in shard]
    return sorted(predictions, key=lambda p: p["index"])


def summarize(predictions: list) -> dict:
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
        # the format outcome_reward gates on (<think>...</think><answer>...</answer>), not just an <answer> tag
        "format_ok": sum(has_think_answer_format(p["prediction"]) for p in predictions) / len(predictions),
    }


def print_table(summary: dict) -> None:
    print(f"{'group':<32}{'score':>8}{'count':>8}")
    for section in ("by_dataset", "by_problem_type"):
        for name, entry in summary[section].items():
            print(f"{name:<32}{100 * entry['score']:>8.1f}{entry['count']:>8}")
    overall = summary["overall"]
    print(f"{'overall':<32}{100 * overall['score']:>8.1f}{overall['count']:>8}")


@exit_on_input_error
def main(argv=None):
    args = parse_args(argv)
    rank, world_size = init_distributed()
    # rows first: a bad registry or dataset name must not leave a half-made output directory behind
    rows = load_rows(args.data_path, args.registry)[: args.max_samples]
    if rank == 0:
        prepare_output_dir(args.output_dir)
        write_run_info(args.output_dir, args)
    max_images = max(len(row["images"]) for row in rows)
    generate = build_generator(args, rank, max_images)
    predictions = evaluate_shard(rows, list(range(rank, len(rows), world_size)), generate, args, rank == 0)
    predictions = gather_in_input_order(predictions, world_size)
    if rank != 0:
        return
    summary = summarize(predictions)
    summary.update(model_path=args.model_path, data_path=args.data_path, prompt_template=args.prompt_template,
                   backend=args.backend)
    lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
    write_atomic(os.path.join(args.output_dir, "predictions.jsonl"), lines)
    write_atomic(os.path.join(args.output_dir, "summary.json"), json.dumps(summary, indent=2))
    print_table(summary)


if __name__ == "__main__":
    main()
