"""Benchmark scores: ChartQA's relaxed accuracy and MME's perception / cognition score computed as VLMEvalKit does, on
the answer read by rule from <answer> (no LLM judge); any other benchmark gets the mean rule-based outcome reward,
labelled as not comparable with its official number. Per-category means come with every benchmark."""
import ast
import csv
import io
import re
from collections import defaultdict

from sophiavl.utils.outcome_reward import extract_answer, has_think_answer_format

RULE_BASED = "rule-based, not comparable"
RELAXED_ACCURACY = "ChartQA relaxed accuracy (5% numeric tolerance)"
MME_SCORE = "MME score: perception + cognition, each the sum over its subtasks of acc + acc+ (in %)"
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
GROUP_COLUMNS = ("split", "category", "l2-category")  # VLMEvalKit reports per split / category when the TSV has them


def metric_for(benchmark):
    """Which metric a benchmark gets, by its VLMEvalKit name (MME, ChartQA_TEST, ...)."""
    name = benchmark.lower()
    if name == "mme":
        return MME_SCORE
    if name == "chartqa" or name.startswith("chartqa_"):  # not ChartQAPro: its metric differs
        return RELAXED_ACCURACY
    return RULE_BASED


def graded_answer(completion, max_answer_chars, strict_format=False):
    """The <answer> text under the same gate as utils.outcome_reward.outcome_reward (think/answer format, length cap)."""
    completion = completion.replace("$", "")
    answer = None
    if has_think_answer_format(completion, strict=strict_format):
        answer = extract_answer(completion, last=strict_format)
    return answer.strip() if answer is not None and len(answer) <= max_answer_chars else None


def relaxed_correctness(prediction, target, max_relative_change=0.05):
    """ChartQA's rule (pix2struct, as VLMEvalKit has it): within 5% of a numeric target, else a case-insensitive exact
    match. "12%" reads as 0.12; a target of 0 falls back to the exact match (no relative change to 0)."""
    def to_float(text):
        try:
            return float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            return None

    predicted, expected = to_float(prediction), to_float(target)
    if predicted is not None and expected:
        return abs(predicted - expected) / abs(expected) <= max_relative_change
    return prediction.lower() == target.lower()


def yes_no(text):
    """VLMEvalKit's YOrN_Extraction: "Yes" / "No" when exactly one of the two words occurs, else "Unknown"."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    if ("yes" in words) != ("no" in words):
        return "Yes" if "yes" in words else "No"
    return "Unknown"


def _targets(answer):
    """ChartQA answers may be a Python-literal list of accepted answers; the best match counts."""
    if answer.startswith("[") and answer.endswith("]"):
        try:
            return [str(item) for item in ast.literal_eval(answer)]
        except (ValueError, SyntaxError):
            pass
    return [answer]


def row_scores(metric, predictions, max_answer_chars, strict_format=False):
    """Per-row score under `metric`: 0/1 for ChartQA and MME, the outcome reward otherwise."""
    if metric == RULE_BASED:
        return [p["score"] for p in predictions]
    scores = []
    for p in predictions:
        answer = graded_answer(p["prediction"], max_answer_chars, strict_format)
        if answer is None:
            scores.append(0.0)
        elif metric == RELAXED_ACCURACY:
            scores.append(float(any(relaxed_correctness(answer, target) for target in _targets(p["answer"]))))
        else:
            scores.append(float(yes_no(answer) == p["answer"]))
    return scores


def mme_score(rows, scores):
    """Per subtask (category): acc = % of questions right, acc+ = % of images whose questions are all right (MME pairs
    two per image, grouped by image_path); perception and cognition sum their subtasks' acc + acc+."""
    by_image = defaultdict(lambda: defaultdict(list))
    for row, score in zip(rows, scores):
        by_image[row["source"].get("category", "")][row["image_key"]].append(score)
    subtasks = {}
    for category, images in sorted(by_image.items()):
        acc = 100 * sum(sum(s) for s in images.values()) / sum(len(s) for s in images.values())
        acc_plus = 100 * sum(all(s) for s in images.values()) / len(images)
        subtasks[category] = acc + acc_plus
    perception = sum(subtasks.get(c, 0.0) for c in MME_PERCEPTION)
    cognition = sum(subtasks.get(c, 0.0) for c in MME_COGNITION)
    return {
        "perception": perception,
        "cognition": cognition,
        "subtasks": subtasks,
        "missing_subtasks": [c for c in MME_PERCEPTION + MME_COGNITION if c not in subtasks],
        "score": perception + cognition,
    }


def benchmark_summary(benchmark, rows, predictions, max_answer_chars, strict_format=False):
    """(summary entry, per-row scores) of one benchmark; rows and predictions aligned."""
    metric = metric_for(benchmark)
    scores = row_scores(metric, predictions, max_answer_chars, strict_format)
    entry = {"metric": metric, "score": sum(scores) / len(scores), "count": len(scores)}
    if metric == MME_SCORE:
        entry.update(mme_score(rows, scores))
    for column in GROUP_COLUMNS:
        groups = defaultdict(list)
        for row, score in zip(rows, scores):
            if column in row["source"]:
                groups[row["source"][column]].append(score)
        if groups:
            entry[f"by_{column}"] = {name: {"score": sum(s) / len(s), "count": len(s)}
                                     for name, s in sorted(groups.items())}
    return entry, scores


def scores_csv(benchmarks):
    """One line per number: benchmark, metric, group (overall / perception / cognition / subtask / a GROUP_COLUMN),
    name, score, count (empty for MME's summed scores)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["benchmark", "metric", "group", "name", "score", "count"])
    for benchmark, entry in benchmarks.items():
        metric = entry["metric"]
        writer.writerow([benchmark, metric, "overall", benchmark, entry["score"], entry["count"]])
        for group in ("perception", "cognition"):
            if group in entry:
                writer.writerow([benchmark, metric, group, group, entry[group], ""])
        for name, value in entry.get("subtasks", {}).items():
            writer.writerow([benchmark, metric, "subtask", name, value, ""])
        for column in GROUP_COLUMNS:
            for name, group in entry.get(f"by_{column}", {}).items():
                writer.writerow([benchmark, metric, column, name, group["score"], group["count"]])
    return text.getvalue()
