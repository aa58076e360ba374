"""Judge quality of a thinking reward model on a held-out labelled JSONL.

    python step1_reward_model/evaluate.py --data heldout.jsonl --model-path OUT/final --output-dir OUT/eval
    python step1_reward_model/evaluate.py --data heldout.jsonl --judge-url http://localhost:8000/v1 --output-dir ...

Scores every row in-process (transformers, greedy) or through a served endpoint (utils.trm_client), then
reports MAE, RMSE, Spearman, pairwise accuracy, mean predicted score per true interval and the
parse-failure rate: a table on stdout, metrics.json and predictions.jsonl in --output-dir, and with
--plot a calibration chart (calibration.png, needs matplotlib).

Definitions. MAE / RMSE / Spearman use the rows whose prediction parsed. Spearman is the Pearson
correlation of average ranks (ties share their mean rank). Pairwise accuracy: over pairs of responses to
the same question (and images) whose labels differ and whose predictions both parsed, the fraction the
judge orders like the labels; a tied prediction counts one half.
"""
import argparse
import importlib.util
import json
import math
import os
from collections import defaultdict

from tqdm import tqdm

from sophiavl.utils.cli import InputError, exit_on_input_error
from sophiavl.utils.data import open_images
from sophiavl.utils.outputs import prepare_output_dir, write_atomic, write_run_info
from sophiavl.utils.prompts import JUDGE_THINKING, trm_messages
from sophiavl.utils.outcome_reward import parse_score

if not __package__:  # run as a script (`deepspeed step1_reward_model/evaluate.py`, or a copy of the folder)
    from sophiavl.utils.stage import stage_package
    __package__ = stage_package(__file__)

from .balance import NUM_BUCKETS, interval_name, score_bucket
from .data import question_key, read_trm_rows


def average_ranks(values: list[float]) -> list[float]:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def pearson(xs: list[float], ys: list[float]) -> float:
    """NaN when either side is constant (or fewer than two points): no correlation is defined."""
    if len(xs) < 2:
        return float("nan")
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    cov = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    var_x = sum((x - mean_x) ** 2 for x in xs)
    var_y = sum((y - mean_y) ** 2 for y in ys)
    return cov / math.sqrt(var_x * var_y) if var_x > 0 and var_y > 0 else float("nan")


def spearman(xs: list[float], ys: list[float]) -> float:
    return pearson(average_ranks(xs), average_ranks(ys))


def pairwise_accuracy(labels: list[float], predictions: list, groups: list[str]) -> tuple[float, int]:
    """(accuracy, number of pairs) over same-group pairs with different labels and parsed predictions."""
    by_group = defaultdict(list)
    for label, prediction, group in zip(labels, predictions, groups):
        if prediction is not None:
            by_group[group].append((label, prediction))
    credit, pairs = 0.0, 0
    for members in by_group.values():
        for i in range(len(members)):
            for j in range(i + 1, len(members)):
                (label_i, pred_i), (label_j, pred_j) = members[i], members[j]
                if label_i == label_j:
                    continue
                pairs += 1
                if pred_i == pred_j:
                    credit += 0.5
                elif (pred_i > pred_j) == (label_i > label_j):
                    credit += 1
    return (credit / pairs if pairs else float("nan")), pairs


def judge_metrics(labels: list[float], predictions: list, groups: list[str]) -> dict:
    """Every metric of the module docstring; `predictions` holds None where the judge's output did not parse."""
    if not labels:
        raise InputError("no rows to evaluate")
    parsed = [(label, prediction) for label, prediction in zip(labels, predictions) if prediction is not None]
    errors = [prediction - label for label, prediction in parsed]
    accuracy, pairs = pairwise_accuracy(labels, predictions, groups)
    intervals = []
    for bucket in range(NUM_BUCKETS):
        members = [prediction for label, prediction in parsed if score_bucket(label) == bucket]
        total = sum(1 for label in labels if score_bucket(label) == bucket)
        intervals.append({"interval": interval_name(bucket), "rows": total, "parsed": len(members),
                          "mean_predicted": sum(members) / len(members) if members else None})
    nan = float("nan")
    return {
        "rows": len(labels),
        "parsed": len(parsed),
        "parse_failure_rate": 1 - len(parsed) / len(labels),
        "mae": sum(abs(e) for e in errors) / len(errors) if errors else nan,
        "rmse": math.sqrt(sum(e * e for e in errors) / len(errors)) if errors else nan,
        "spearman": spearman([l for l, _ in parsed], [p for _, p in parsed]),
        "pairwise_accuracy": accuracy,
        "pairs": pairs,
        "intervals": intervals,
    }


def format_table(metrics: dict) -> str:
    lines = [f"rows {metrics['rows']}, parsed {metrics['parsed']} "
             f"(parse failures {100 * metrics['parse_failure_rate']:.1f}%)",
             f"MAE {metrics['mae']:.4f}   RMSE {metrics['rmse']:.4f}   Spearman {metrics['spearman']:.4f}   "
             f"pairwise accuracy {metrics['pairwise_accuracy']:.4f} over {metrics['pairs']} pairs",
             f"{'true interval':<14}{'rows':>7}{'mean predicted':>16}"]
    for entry in metrics["intervals"]:
        mean = "-" if entry["mean_predicted"] is None else f"{entry['mean_predicted']:.3f}"
        lines.append(f"{entry['interval']:<14}{entry['rows']:>7}{mean:>16}")
    return "\n".join(lines)


def score_in_process(rows: list[dict], model_path: str, batch_size: int, max_new_tokens: int, dtype: str,
                     min_pixels: int | None, max_pixels: int | None) -> list[str]:
    import torch

    from sophiavl.utils.generation import Sampling, hf_generate
    from sophiavl.utils.model import load_model, load_processor, resolve_dtype

    processor = load_processor(model_path, min_pixels, max_pixels)
    model = load_model(model_path, resolve_dtype(dtype)).eval()
    if torch.cuda.is_available():
        model.to("cuda")
    texts = []
    for start in tqdm(range(0, len(rows), batch_size), desc="TRM (in-process)"):
        batch = rows[start:start + batch_size]
        images = [open_images(row) for row in batch]
        chats = [trm_messages(r["question"], r["response"], len(i)) for r, i in zip(batch, images)]
        texts += hf_generate(model, processor, chats, images, Sampling(max_new_tokens=max_new_tokens),
                             enable_thinking=JUDGE_THINKING)[0]
    return texts


def score_with_endpoint(rows: list[dict], url: str, model_name: str, args) -> list[str | None]:
    from sophiavl.utils.trm_client import TRMClient

    client = TRMClient(url, model_name, max_concurrency=args.max_concurrency, timeout_s=args.timeout,
                       max_retries=args.max_retries, max_tokens=args.max_new_tokens)
    items = [(row["question"], row["response"], open_images(row)) for row in rows]
    return [result.text for result in client.score_many_sync(items, progress=True)]


def plot_calibration(labels: list[float], predictions: list, metrics: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 5))
    parsed = [(label, prediction) for label, prediction in zip(labels, predictions) if prediction is not None]
    axis.scatter([l for l, _ in parsed], [p for _, p in parsed], s=8, alpha=0.25, label="rows")
    centres = [(b + 0.5) / 10 for b, entry in enumerate(metrics["intervals"]) if entry["mean_predicted"] is not None]
    means = [entry["mean_predicted"] for entry in metrics["intervals"] if entry["mean_predicted"] is not None]
    axis.plot(centres, means, "o-", color="C1", label="mean predicted per interval")
    axis.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    axis.set(xlim=(-0.05, 1.05), ylim=(-0.05, 1.05), xlabel="label score", ylabel="predicted score",
             title=f"TRM calibration (MAE {metrics['mae']:.3f}, Spearman {metrics['spearman']:.3f})")
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="held-out labelled JSONL (annotate / balance / trm_traces format)")
    parser.add_argument("--image-base", default=None, help="folder of relative image paths (default: the JSONL's folder)")
    parser.add_argument("--output-dir", required=True)
    judge = parser.add_mutually_exclusive_group(required=True)
    judge.add_argument("--model-path", help="score in-process with this HF directory (greedy)")
    judge.add_argument("--judge-url", help="score through an OpenAI-compatible endpoint, e.g. http://host:8000/v1")
    parser.add_argument("--judge-model", default="thinking-reward-model", help="served model name (--judge-url)")
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N rows")
    parser.add_argument("--batch-size", type=int, default=8, help="in-process generation batch")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="auto", help="in-process: auto (bf16 on GPU, fp32 on CPU), float32, ...")
    parser.add_argument("--min-pixels", type=int, default=None)
    parser.add_argument("--max-pixels", type=int, default=None)
    parser.add_argument("--max-concurrency", type=int, default=32, help="endpoint requests in flight")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per endpoint request")
    parser.add_argument("--max-retries", type=int, default=3)
    parser.add_argument("--plot", action="store_true", help="write calibration.png (needs matplotlib)")
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_new_tokens", "max_concurrency"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_samples is not None and args.max_samples < 1:
        raise InputError(f"--max-samples must be >= 1, got {args.max_samples}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise InputError("--plot needs matplotlib (pip install matplotlib)")
    return args


@exit_on_input_error
def main(argv=None) -> dict:
    args = parse_args(argv)
    rows = read_trm_rows(args.data, args.image_base)[:args.max_samples]
    prepare_output_dir(args.output_dir)
    write_run_info(args.output_dir, args)
    if args.model_path:
        texts = score_in_process(rows, args.model_path, args.batch_size, args.max_new_tokens, args.dtype,
                                 args.min_pixels, args.max_pixels)
    else:
        texts = score_with_endpoint(rows, args.judge_url, args.judge_model, args)
    predictions = [parse_score(text) if text is not None else None for text in texts]
    labels = [row["score"] for row in rows]
    metrics = judge_metrics(labels, predictions, [question_key(row) for row in rows])
    with open(os.path.join(args.output_dir, "predictions.jsonl"), "w", encoding="utf-8") as f:
        for row, text, prediction in zip(rows, texts, predictions):
            f.write(json.dumps({"id": row["id"], "label": row["score"], "predicted": prediction, "judge_text": text},
                               ensure_ascii=False) + "\n")
    write_atomic(os.path.join(args.output_dir, "metrics.json"), json.dumps(metrics, indent=2) + "\n")
    if args.plot:
        plot_calibration(labels, predictions, metrics, os.path.join(args.output_dir, "calibration.png"))
    print(format_table(metrics))
    return metrics


if __name__ == "__main__":
    main()
