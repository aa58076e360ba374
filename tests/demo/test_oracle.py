"""The oracle judge: the five criteria on hand-made traces, its scores computed by hand, and where it agrees with the
known scores of demo/trm_traces.py's flawed traces."""
import random

import pytest

from sophiavl.demo.synthetic_tasks import make_rows
from sophiavl.demo.trace_quality import oracle_criteria, oracle_score
from sophiavl.demo.trm_traces import build_trace, trace_score, unwrap_answer

COLOUR = {"data_source": "tiny_synthetic/colour", "facts": {"colour": "red", "background": "white"},
          "options": ["A. red", "B. green", "C. blue", "D. yellow"], "solution": "<answer>A</answer>"}
COUNT = {"data_source": "tiny_synthetic/count", "facts": {"squares": ["top left", "bottom right"]}, "options": []}
WORD = {"data_source": "tiny_synthetic/word", "facts": {"word": "GO"}, "options": []}
DESCRIBE = {"data_source": "tiny_synthetic/describe", "facts": {"colour": "blue", "shape": "circle"}, "options": []}
SUM = {"data_source": "tiny_synthetic/arithmetic", "facts": {"a": 3, "b": 4}, "options": []}


def trace(thinking, answer):
    return f"<think>{thinking}</think><answer>{answer}</answer>"


@pytest.mark.parametrize("row, completion, score", [
    (COLOUR, trace("the shape is red. red is option A.", "A"), 1.0),
    (COLOUR, trace("The shape is RED.  red is option a", "A"), 1.0),  # case and spacing do not matter
    (COLOUR, trace("the shape is green. green is option B.", "B"), 0.5),  # a wrong fact, soundly followed
    (COLOUR, trace("the shape is green. red is option A.", "A"), 0.1),  # a wrong fact and a step that does not follow
    (COLOUR, trace("the shape is red. red is option C.", "C"), 0.5),  # the lookup misreads the options
    (COLOUR, trace("the shape is red. red is option A.", "B"), 0.3),  # the answer is not what the steps reached
    (COLOUR, trace("the shape is red.", "A"), 1.0),  # the shape's colour names its option
    (COLOUR, trace("the shape is red. the shape is red. red is option A.", "A"), 0.9),
    (COLOUR, trace("let me think. the shape is red. hmm. red is option A.", "A"), 0.8),
    (COLOUR, trace("the shape is red. 让我想想. red is option A.", "A"), 0.7),
    (COLOUR, trace("the shape is red. but the shape is not red. red is option A.", "A"), 0.5),
    (COLOUR, trace("the background is white. the shape is red. red is option A.", "A"), 1.0),
    (COLOUR, trace("", "A"), 0.0),
    (COLOUR, "<answer>A</answer>", 0.0),
    (COUNT, trace("a square at the top left. a square at the bottom right. that makes 2 squares.", "2"), 1.0),
    (COUNT, trace("a square at the top left. a square at the top right. that makes 2 squares.", "2"), 0.5),
    (COUNT, trace("a square at the top left. a square at the bottom right. that makes 3 squares.", "3"), 0.6),
    (COUNT, trace("a square at the top left. that makes 2 squares.", "2"), 0.6),
    (WORD, trace("the letters are G O. they spell GO.", "GO"), 1.0),
    (WORD, trace("the letters are G O. they spell NO.", "NO"), 0.6),
    (DESCRIBE, trace("the colour is blue. the shape is a circle.", "blue circle"), 1.0),
    (DESCRIBE, trace("the colour is red. the shape is a circle.", "red circle"), 0.5),
    (DESCRIBE, trace("the colour is blue.", "blue circle"), 0.3),  # the shape was never stated
    (SUM, trace("3 plus 4 is 7.", "7"), 1.0),
    (SUM, trace("3 plus 4 is 8.", "8"), 0.6),  # a step that does not follow
    (SUM, trace("3 plus 5 is 8.", "8"), 0.5),  # misread operands: a wrong fact
    (SUM, trace("3 plus 4 is 7. so the sum is 7.", "7"), 1.0),
    (SUM, trace("the student says 7. so the sum is 7.", "7"), 0.1),  # nobody says anything here; nothing computed
])
def test_scores_by_hand(row, completion, score):
    assert oracle_score(completion, row) == score


def test_criteria_are_counted_separately():
    found = oracle_criteria(trace("the shape is green. red is option A. red is option A. hmm. 我想", "B"), COLOUR)
    assert {k: found[k] for k in ("false_facts", "not_following", "unsupported_answer", "repeats", "extraneous",
                                  "language_switch")} == {"false_facts": 1, "not_following": 1, "unsupported_answer": 1,
                                                          "repeats": 1, "extraneous": 1, "language_switch": True}
    assert found["claims"] == ["shape_colour", "option"]
    assert oracle_score(trace("the shape is green. red is option A. red is option A. hmm. 我想", "B"), COLOUR) == 0.0


@pytest.mark.parametrize("flaws", [(), ("extraneous",), ("repetition",), ("language_switch",), ("unsupported_answer",),
                                   ("empty_thinking",), ("extraneous", "repetition")])
def test_agrees_with_the_known_scores_of_synthetic_traces_where_the_flaw_is_the_same(flaws):
    for row, _ in make_rows(25, seed=3, split="train"):
        completion = build_trace(row["reasoning"], unwrap_answer(row["solution"]), flaws, random.Random(row["problem_id"]))
        assert oracle_score(completion, row) == trace_score(flaws), completion


def test_a_wrong_step_or_a_contradiction_costs_at_least_half():
    for row, _ in make_rows(25, seed=3, split="train"):
        for flaw in ("wrong_step", "contradiction"):
            completion = build_trace(row["reasoning"], unwrap_answer(row["solution"]), (flaw,), random.Random(1))
            assert oracle_score(completion, row) <= 0.6, completion
