"""True quality of a tiny policy's reasoning, scored against the synthetic task's own correct steps.

The task generator (demo/synthetic_tasks.py) knows the right intermediate steps of every row, e.g.
["the shape is red", "red is option A"]. A completion's `<think>` is split into sentences and matched
against them as multisets:

    precision = matched sentences / sentences written     (repetition, fillers, wrong facts, contradictions)
    recall    = matched sentences / reference steps       (missing or wrong steps, empty thinking)
    quality   = F1 of the two, 0 when there is no <think> or it is empty

It sees the reasoning only; whether the final answer is right is the outcome reward's business.
"""
import collections
import re

THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def think_text(completion: str) -> str:
    match = THINK.search(completion)
    return match.group(1).strip() if match else ""


def sentences(text: str) -> list[str]:
    return [" ".join(part.lower().split()) for part in re.split(r"[.!?。]", text) if part.strip()]


def trace_quality(completion: str, reference_steps: list[str]) -> float:
    written = sentences(think_text(completion))
    reference = [" ".join(step.lower().split()) for step in reference_steps]
    if not written or not reference:
        return 0.0
    matched = sum((collections.Counter(written) & collections.Counter(reference)).values())
    if matched == 0:
        return 0.0
    precision, recall = matched / len(written), matched / len(reference)
    return 2 * precision * recall / (precision + recall)


def think_words(completion: str) -> int:
    """Length of the reasoning in words (the tiny BPE's tokens are not comparable across texts)."""
    return len(think_text(completion).split())
