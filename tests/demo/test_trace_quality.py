"""True trace quality: the F1 of the written reasoning sentences against the task's correct steps."""
import pytest

from sophiavl.demo.trace_quality import think_words, trace_quality

STEPS = ["the shape is red", "red is option A"]


def test_the_correct_chain_scores_one_and_case_and_spacing_do_not_matter():
    assert trace_quality("<think>the shape is red. red is option A.</think><answer>A</answer>", STEPS) == 1.0
    assert trace_quality("<think> The  shape is RED.red is option a</think><answer>A</answer>", STEPS) == 1.0


def test_flaws_cost_what_the_f1_says():
    # one of two steps wrong: precision 1/2, recall 1/2
    assert trace_quality("<think>the shape is green. red is option A.</think>", STEPS) == pytest.approx(0.5)
    # a repeated step: 3 sentences, 2 matched (a multiset: the copy does not match twice) -> P 2/3, R 1, F1 0.8
    assert trace_quality("<think>the shape is red. the shape is red. red is option A.</think>", STEPS) == \
        pytest.approx(0.8)
    # one step missing: P 1, R 1/2 -> 2/3
    assert trace_quality("<think>red is option A.</think><answer>A</answer>", STEPS) == pytest.approx(2 / 3)
    # a filler and a Chinese phrase: P 2/4, R 1 -> 2/3
    assert trace_quality("<think>the shape is red. 让我想想。 it is simple. red is option A.</think>", STEPS) == \
        pytest.approx(2 / 3)


def test_no_or_empty_or_unrelated_thinking_scores_zero():
    assert trace_quality("<think></think><answer>A</answer>", STEPS) == 0.0
    assert trace_quality("<answer>A</answer>", STEPS) == 0.0
    assert trace_quality("<think>blue is option C.</think>", STEPS) == 0.0
    assert trace_quality("<think>the shape is red.</think>", []) == 0.0


def test_think_words_counts_only_the_reasoning():
    assert think_words("<think>the shape is red. red is option A.</think><answer>A</answer>") == 8
    assert think_words("<answer>A</answer>") == 0
