"""Filter noisy judge labels and sample them evenly across the ten score intervals (docs/method.md, stage 1).

    python step1_reward_model/balance.py --input labels.jsonl --output trm_train.jsonl --cap 15000 --min 5000

Rules, applied in this order, each row counted under the first that drops it: not scored (failed or no
score), empty response, truncated response (no closing </answer>, or a truthy "truncated" field), duplicate
(question, response). Buckets: round(10 * score), with 1.0 joining the last interval [0.9, 1.0]. Each interval
keeps at most --cap rows, sampled without replacement by --seed; intervals under --min are only flagged.
"""
import argparse
import json
import logging
import math
import os
import random

import jsonlines

from sophiavl.utils.cli import InputError, exit_on_input_error
from sophiavl.utils.data import read_jsonl_objects
from sophiavl.utils.outputs import prepare_output_dir, write_atomic

logger = logging.getLogger("balance")

NUM_BUCKETS = 10
RULES = ("not_scored", "empty_response", "truncated", "duplicate")


def score_bucket(score: float) -> int:
    """Interval index 0..9; round, not floor: floor would put 0.7 - 0.3 = 0.39999999999999997 in interval 3."""
    return min(round(10 * score), NUM_BUCKETS - 1)


def interval_name(bucket: int) -> str:
    low, high = bucket / 10, (bucket + 1) / 10
    return f"[{low:.1f}, {high:.1f}]" if bucket == NUM_BUCKETS - 1 else f"[{low:.1f}, {high:.1f})"


def drop_reason(row: dict, seen: set) -> str | None:
    score = row.get("score")
    if row.get("status", "scored") != "scored" or not isinstance(score, (int, float)) or isinstance(score, bool) \
            or not math.isfinite(score) or not 0 <= score <= 1:
        return "not_scored"
    response = row.get("response") or ""
    if not response.strip():
        return "empty_response"
    if row.get("truncated") or "</answer>" not in response:
        return "truncated"
    key = (row.get("question"), response)
    if key in seen:
        return "duplicate"
    seen.add(key)
    return None


def filter_rows(rows: list[dict]) -> tuple[list[dict], dict]:
    """Rows that pass every rule (first occurrence of a duplicate kept), and how many each rule dropped."""
    counts = dict.fromkeys(RULES, 0)
    kept, seen = [], set()
    for row in rows:
        reason = drop_reason(row, seen)
        if reason is None:
            kept.append(row)
        else:
            counts[reason] += 1
    return kept, counts


def sample_buckets(rows: list[dict], cap: int | None, seed: int) -> tuple[list[dict], list[int], list[int]]:
    """At most `cap` rows per interval, drawn without replacement; the kept rows stay in input order.

    Returns (sampled rows, per-interval counts before, per-interval counts after).
    """
    by_bucket = [[] for _ in range(NUM_BUCKETS)]
    for index, row in enumerate(rows):
        by_bucket[score_bucket(row["score"])].append(index)
    rng = random.Random(seed)
    chosen = [indices if cap is None or len(indices) <= cap else rng.sample(indices, cap) for indices in by_bucket]
    before = [len(indices) for indices in by_bucket]
    after = [len(indices) for indices in chosen]
    kept = sorted(index for indices in chosen for index in indices)
    return [rows[index] for index in kept], before, after


def balance(rows: list[dict], cap: int | None = None, min_per_interval: int = 0, seed: int = 0) -> tuple[list[dict], dict]:
    """Filter, then sample per interval. Returns (rows, report); the report flags intervals under the minimum."""
    kept, dropped = filter_rows(rows)
    sampled, before, after = sample_buckets(kept, cap, seed)
    intervals = [{"interval": interval_name(b), "before": before[b], "after": after[b],
                  "below_min": after[b] < min_per_interval} for b in range(NUM_BUCKETS)]
    report = {"input_rows": len(rows), "dropped": dropped, "after_filter": len(kept), "output_rows": len(sampled),
              "cap": cap, "min": min_per_interval, "seed": seed, "intervals": intervals}
    return sampled, report


def read_rows(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise InputError(f"--input {path}: file not found")
    rows = []
    for where, row in read_jsonl_objects(path):
        if not isinstance(row.get("response"), str) or "score" not in row:
            raise InputError(f"{where}: expected an annotation row with 'response' and 'score'")
        rows.append(row)
    return rows


def format_table(report: dict) -> str:
    lines = [f"{'interval':<12}{'before':>9}{'after':>9}"]
    for entry in report["intervals"]:
        flag = "  below --min" if entry["below_min"] else ""
        lines.append(f"{entry['interval']:<12}{entry['before']:>9}{entry['after']:>9}{flag}")
    dropped = ", ".join(f"{rule} {count}" for rule, count in report["dropped"].items())
    lines.append(f"input {report['input_rows']}, dropped: {dropped}; kept {report['after_filter']}, "
                 f"output {report['output_rows']}")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="labels JSONL from annotate.py")
    parser.add_argument("--output", required=True, help="balanced JSONL")
    parser.add_argument("--report", default=None, help="JSON report (default: OUTPUT with .report.json)")
    parser.add_argument("--cap", type=int, default=None, help="most rows per interval (paper: 15000); none by default")
    parser.add_argument("--min", type=int, default=0, dest="min_per_interval",
                        help="flag intervals with fewer rows (paper: 5000); rows are never duplicated")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    if args.cap is not None and args.cap < 1:
        raise InputError(f"--cap must be >= 1, got {args.cap}")
    if args.min_per_interval < 0:
        raise InputError(f"--min must be >= 0, got {args.min_per_interval}")
    if args.cap is not None and args.min_per_interval > args.cap:
        raise InputError(f"--min {args.min_per_interval} is above --cap {args.cap}")
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise InputError("--output must differ from --input")
    args.report = args.report or os.path.splitext(args.output)[0] + ".report.json"
    return args


@exit_on_input_error
def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    rows = read_rows(args.input)
    sampled, report = balance(rows, args.cap, args.min_per_interval, args.seed)
    for entry in report["intervals"]:
        if entry["below_min"]:
            logger.warning("interval %s has %d rows, under --min %d", entry["interval"], entry["after"],
                           args.min_per_interval)
    for path in (args.output, args.report):
        prepare_output_dir(os.path.dirname(os.path.abspath(path)), flag="--output/--report")
    tmp = f"{args.output}.tmp-{os.getpid()}"
    with jsonlines.open(tmp, "w") as writer:
        writer.write_all(sampled)
    os.replace(tmp, args.output)
    write_atomic(args.report, json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    return report


if __name__ == "__main__":
    main()
