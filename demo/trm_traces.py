"""Synthetic thinking-reward-model data: reasoning traces of KNOWN quality for the synthetic tasks.

    python demo/trm_traces.py --registry DIR/data/dataset_info.json --data-path tiny_train --output traces.jsonl

From each task row's correct reasoning steps this builds the correct chain
`<think>step. step.</think><answer>X</answer>` (score 1.0) -- the style the tiny warm-started policy
writes (demo/warm_start.py), so the judge is trained on the responses it will score -- and the same
chain with controlled flaws. Each flaw costs a fixed number of tenths; several flaws add up:

    extraneous          an irrelevant remark                                   -0.1
    repetition          one step said three times                              -0.2
    language_switch     a Chinese phrase in the English reasoning              -0.3
    wrong_step          an intermediate step states a wrong fact               -0.5
    contradiction       a step followed by its own negation                    -0.6
    unsupported_answer  the final answer is not the one the reasoning reached  -0.7
    empty_thinking      nothing between <think> and </think>                   score 0.0

Per row: the correct chain, each single flaw, and --pairs-per-row random two-flaw combinations (seeded),
so every score 0.0, 0.1, ..., 1.0 occurs. `--labels inverted` trains a *hacked* judge (score 1 - s: flawed
reasoning scores high) and `--labels shuffled` an *untrained-TRM stand-in* (the scores permuted across
traces: the judge learns the output format and nothing else); experiments/ablations.py uses both.
Output rows are in annotate.py's format (id, question, response, images relative to the output file,
score, judge_text, status "scored", error) plus
source_id, flaws, problem_type and answer, so balance.py and the TRM trainer read them as they are.
The question is the policy's training prompt text (utils.prompts.format_question), what step 2 sends
to the TRM.
"""
import argparse
import collections
import itertools
import json
import os
import random
import re

from sophiavl.utils.cli import InputError, exit_on_input_error
from sophiavl.utils.data import load_registry, load_rows
from sophiavl.utils.prompts import format_question

PENALTY_TENTHS = {"extraneous": 1, "repetition": 2, "language_switch": 3, "wrong_step": 5, "contradiction": 6,
                  "unsupported_answer": 7}
EMPTY_THINKING = "empty_thinking"
FLAWS = tuple(PENALTY_TENTHS) + (EMPTY_THINKING,)

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
SWAPS = {"top": "bottom", "bottom": "top", "left": "right", "right": "left"}
FILLERS = ("this is a simple question", "there is nothing else to consider", "the question is short")
CHINESE_PHRASES = ("让我想想", "我再检查一下", "这一步是对的")
NEGATIONS = ((" is ", " is not "), (" are ", " are not "), (" makes ", " does not make "), (" spell ", " do not spell "))


def trace_score(flaws) -> float:
    """Known quality of a trace with these flaws, on the 0.1 grid (computed in tenths: no float drift)."""
    if EMPTY_THINKING in flaws:
        return 0.0
    return max(0, 10 - sum(PENALTY_TENTHS[flaw] for flaw in flaws)) / 10


def _other(options, current, rng):
    return rng.choice([option for option in options if option != current])


def perturb(text: str, rng: random.Random) -> str:
    """The same sentence (or answer) with one fact made wrong: a number, colour, shape, option letter,
    position or spelled letter replaced by another; text with none of these gets negated."""
    numbers = list(re.finditer(r"\d+", text))
    if numbers:
        last = numbers[-1]
        value = int(last.group(0))
        wrong = value + rng.choice([1, 2]) if value < 2 else value + rng.choice([-1, 1])
        return text[:last.start()] + str(wrong) + text[last.end():]
    for words in (COLOURS, SHAPES):
        found = re.search(r"\b(" + "|".join(words) + r")\b", text)
        if found:
            return text[:found.start()] + _other(words, found.group(1), rng) + text[found.end():]
    found = re.search(r"\b(" + "|".join(SWAPS) + r")\b", text)
    if found:
        return text[:found.start()] + SWAPS[found.group(1)] + text[found.end():]
    letter = re.search(r"\b[A-D]\b", text)
    if letter:
        return text[:letter.start()] + _other("ABCD", letter.group(0), rng) + text[letter.end():]
    capitals = list(re.finditer(r"[A-Z]", text))
    if capitals:
        chosen = capitals[-1]
        return text[:chosen.start()] + _other("ABCDEFGHIJKLMNOPQRSTUVWXYZ", chosen.group(0), rng) + text[chosen.end():]
    return negate(text)


def negate(sentence: str) -> str:
    for plain, negated in NEGATIONS:
        if plain in f" {sentence} ":
            return f" {sentence} ".replace(plain, negated, 1).strip()
    return f"it is not true that {sentence}"


def build_trace(steps: list[str], answer: str, flaws, rng: random.Random) -> str:
    """The response text for one combination of flaws, applied to the correct steps."""
    if EMPTY_THINKING in flaws:
        return f"<think></think><answer>{answer}</answer>"
    steps = list(steps)
    if "wrong_step" in flaws:
        steps[0] = perturb(steps[0], rng)
    if "contradiction" in flaws:
        at = rng.randrange(len(steps))
        steps.insert(at + 1, "but " + negate(steps[at]))
    if "repetition" in flaws:
        at = rng.randrange(len(steps))
        steps[at + 1:at + 1] = [steps[at], steps[at]]
    if "extraneous" in flaws:
        steps.insert(rng.randrange(len(steps) + 1), rng.choice(FILLERS))
    if "language_switch" in flaws:
        steps.insert(rng.randrange(len(steps) + 1), rng.choice(CHINESE_PHRASES))
    final = perturb(answer, rng) if "unsupported_answer" in flaws else answer
    return "<think>" + ". ".join(steps) + f".</think><answer>{final}</answer>"


def flaw_sets(pairs_per_row: int, rng: random.Random) -> list[tuple]:
    """The correct chain, every single flaw, and `pairs_per_row` distinct random pairs of flaws."""
    pairs = list(itertools.combinations(PENALTY_TENTHS, 2))
    return [()] + [(flaw,) for flaw in FLAWS] + rng.sample(pairs, min(pairs_per_row, len(pairs)))


def unwrap_answer(answer: str) -> str:
    match = re.fullmatch(r"\s*<answer>(.*?)</answer>\s*", answer, re.DOTALL)
    return (match.group(1) if match else answer).strip()


def read_raw_rows(registry_file: str, data_path: str) -> dict:
    """problem_id -> the task row as its file holds it, `reasoning` and `facts` included (load_rows keeps no extra
    columns)."""
    registry = load_registry(registry_file)
    rows = {}
    for name in (n.strip() for n in data_path.split(",") if n.strip()):
        if name not in registry:
            raise InputError(f"{registry_file}: unknown dataset {name!r}")
        path = registry[name]["file_path"]
        with open(path, encoding="utf-8") as f:
            records = json.load(f) if path.endswith(".json") else [json.loads(line) for line in f if line.strip()]
        for index, record in enumerate(records):
            rows[str(record.get("problem_id", f"{name}:{index}"))] = {**record, "where": f"{path}: row {index}"}
    return rows


def read_reasoning(registry_file: str, data_path: str) -> dict:
    """problem_id -> correct reasoning steps, read from the raw task files."""
    reasoning = {}
    for problem_id, record in read_raw_rows(registry_file, data_path).items():
        steps = record.get("reasoning")
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s for s in steps):
            raise InputError(f"{record['where']}: no 'reasoning' list of steps (synthetic task rows carry one)")
        reasoning[problem_id] = steps
    return reasoning


def make_traces(rows: list[dict], reasoning: dict, output_dir: str, seed: int = 0, pairs_per_row: int = 2) -> list[dict]:
    """Annotation-format rows for every task row, deterministic by `seed`."""
    traces = []
    for row in rows:
        rng = random.Random(f"trm-traces-{seed}-{row['id']}")
        answer = unwrap_answer(row["answer"])
        question = format_question(row["prompt"], row["problem_type"], row["options"])
        images = [os.path.relpath(ref["path"], output_dir) for ref in row["images"]]
        for flaws in flaw_sets(pairs_per_row, rng):
            score = trace_score(flaws)
            traces.append({
                "id": f"{row['id']}:{'+'.join(flaws) or 'correct'}",
                "question": question,
                "response": build_trace(reasoning[row["id"]], answer, flaws, rng),
                "images": images,
                "score": score,
                "judge_text": f"<answer>{score:.1f}</answer>",
                "status": "scored",
                "error": None,
                "source_id": row["id"],
                "flaws": list(flaws),
                "problem_type": row["problem_type"],
                "answer": row["answer"],
            })
    return traces


def relabel(traces: list[dict], labels: str, seed: int) -> list[dict]:
    """The same traces with their scores inverted (1 - s) or permuted across traces (seeded); `true` keeps them."""
    if labels == "true":
        return traces
    if labels == "inverted":
        scores = [round(1.0 - trace["score"], 1) for trace in traces]
    else:
        scores = [trace["score"] for trace in traces]
        random.Random(f"trm-labels-{seed}").shuffle(scores)
    return [{**trace, "score": score, "judge_text": f"<answer>{score:.1f}</answer>", "true_score": trace["score"]}
            for trace, score in zip(traces, scores)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", required=True, help="dataset_info.json of the synthetic tasks")
    parser.add_argument("--data-path", required=True, help="registry name(s), e.g. tiny_train")
    parser.add_argument("--output", required=True, help="traces JSONL")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs-per-row", type=int, default=2, help="random two-flaw traces per task row")
    parser.add_argument("--max-rows", type=int, default=None, help="use only the first N task rows")
    parser.add_argument("--labels", choices=["true", "inverted", "shuffled"], default="true",
                        help="inverted: a hacked judge's labels (1 - score); shuffled: scores permuted (format only)")
    args = parser.parse_args(argv)
    if args.pairs_per_row < 0:
        raise InputError(f"--pairs-per-row must be >= 0, got {args.pairs_per_row}")
    if args.max_rows is not None and args.max_rows < 1:
        raise InputError(f"--max-rows must be >= 1, got {args.max_rows}")
    return args


@exit_on_input_error
def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = load_rows(args.data_path, args.registry)[: args.max_rows]
    reasoning = read_reasoning(args.registry, args.data_path)
    output_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(output_dir, exist_ok=True)
    traces = relabel(make_traces(rows, reasoning, output_dir, args.seed, args.pairs_per_row), args.labels, args.seed)
    tmp = f"{args.output}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(trace, ensure_ascii=False) + "\n" for trace in traces)
    os.replace(tmp, args.output)
    counts = collections.Counter(trace["score"] for trace in traces)
    print(f"wrote {len(traces)} traces from {len(rows)} task rows to {args.output} (labels: {args.labels})")
    print("score counts: " + ", ".join(f"{score:.1f}: {counts[score]}" for score in sorted(counts)))
    return traces


if __name__ == "__main__":
    main()
