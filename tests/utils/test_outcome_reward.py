import json
import math
import os
import random
import re
import time

import pytest

import sophiavl.utils.outcome_reward as outcome_module
from sophiavl.utils.cli import InputError
from sophiavl.utils.prompts import PROBLEM_TYPES
from sophiavl.utils.outcome_reward import (extract_answer, has_think_answer_format, option_letters, outcome_reward,
                                           parse_score)

# The reference's rules (verl/utils/reward_score/math.py of SophiaVL-R1), and the stricter one of --strict-format
REFERENCE_FORMAT = re.compile(r"<think>(.*?)</think>.*<answer>(.*?)</answer>.*", re.DOTALL)
REFERENCE_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
STRICT_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def wrap(answer, think="let me think"):
    return f"<think>{think}</think><answer>{answer}</answer>"


# --- format gate and the answer scored: (response, R^o for truth "5", R^o with strict_format) -----------------

@pytest.mark.parametrize("response, expected, strict", [
    ("<think>a</think><answer>5</answer>", 1.0, 1.0),
    ("<think>a</think>\n \t<answer>5</answer>", 1.0, 1.0),
    ("<think>\nmulti\nline\n</think>\n<answer>\n5\n</answer>", 1.0, 1.0),
    ("<think>a<think>b</think>c</think><answer>5</answer>", 1.0, 1.0),  # nested thinks: both regexes accept
    ("<think></think><answer>5</answer>", 1.0, 1.0),                    # empty thinking
    # text between the blocks, text after the answer: the reference accepts them
    ("<think>a</think> so <answer>5</answer>", 1.0, 0.0),
    ("<think>a</think>\n\nFinal answer:\n<answer>5</answer>", 1.0, 0.0),
    ("<think>a</think><answer>5</answer>\n", 1.0, 0.0),
    ("<think>a</think><answer>5</answer>.", 1.0, 0.0),
    ("<think>a</think><answer>5</answer> done", 1.0, 0.0),
    ("<think>a</think><answer>5</answer> and <answer>", 1.0, 0.0),       # an unclosed tag after the answer
    # several answers: the first one is scored (strict: the last)
    ("<think>a</think><answer>5</answer><answer>6</answer>", 1.0, 0.0),
    ("<think>a</think><answer>6</answer>\n<answer>5</answer>", 0.0, 1.0),
    # an <answer> inside the thinking is the first answer
    ("<think>maybe <answer>5</answer></think><answer>6</answer>", 1.0, 0.0),
    ("<think>maybe <answer>6</answer></think><answer>5</answer>", 0.0, 1.0),
    ("<think>x<answer>5</think><answer>6</answer>", 0.0, 0.0),  # first answer "5</think><answer>6"; strict: "6"
    ("<think>a</answer></think><answer>5</answer>", 1.0, 1.0),   # a stray close tag before the answer
    # nested answers: the first answer runs to the first </answer> ("<answer>5"); strict: "5</answer>"
    ("<think>a</think><answer><answer>5</answer></answer>", 0.0, 0.0),
    ("<think>a</think><answer>$5$</answer>$", 1.0, 1.0),          # $ is stripped before the gate
    ("<think>a</think><answer></answer>", 0.0, 0.0),              # empty answer
    ("<think>a</think><answer> </answer>", 0.0, 0.0),
    # missing or misplaced tags
    ("<answer>5</answer>", 0.0, 0.0),                                   # no think
    ("Sure! <think>a</think><answer>5</answer>", 0.0, 0.0),             # text before <think>
    (" <think>a</think><answer>5</answer>", 0.0, 0.0),                  # even whitespace
    ("<answer>5</answer><think>a</think>", 0.0, 0.0),                   # answer before think
    ("<think>a<answer>5</answer>", 0.0, 0.0),                           # think never closed
    ("<think>a</think>5", 0.0, 0.0),                                    # no answer tags
    ("<think>a</think><answer>5", 0.0, 0.0),                            # answer never closed
    ("<think>a</think><answer>5</answer", 0.0, 0.0),
    ("<think>a</think></answer>5<answer>", 0.0, 0.0),                   # tags in the wrong order
    ("", 0.0, 0.0),
    ("5", 0.0, 0.0),
])
def test_format_gate_and_first_answer(response, expected, strict):
    assert outcome_reward(response, "5", "numerical") == expected
    assert outcome_reward(response, "5", "numerical", strict_format=True) == strict


def test_an_empty_answer_passes_the_gate_and_is_scored_as_empty():
    empty = "<think>a</think><answer></answer>"
    assert has_think_answer_format(empty) and extract_answer(empty) == ""
    for problem_type in ("numerical", "multiple choice", "free-form", "text"):
        assert outcome_reward(empty, "B", problem_type) == 0.0
    assert outcome_reward(empty, "B", "OCR") == pytest.approx(math.exp(-1.0))  # every reference word deleted


def test_format_gates_agree_with_their_regexes_on_token_soup():
    rng = random.Random(0)
    tokens = ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "\u2003", "\x1c", "x", "<", ">", "</"]
    for _ in range(4000):
        text = "".join(rng.choice(tokens) for _ in range(rng.randint(0, 9)))
        if rng.random() < 0.7:  # most random texts fail at the first or last character: make those pass
            text = "<think>" + text + ("</answer>" if rng.random() < 0.7 else "")
        assert has_think_answer_format(text) == bool(REFERENCE_FORMAT.fullmatch(text)), repr(text)
        assert has_think_answer_format(text, strict=True) == bool(STRICT_FORMAT.fullmatch(text)), repr(text)
        reference = REFERENCE_ANSWER.search(text)
        assert extract_answer(text) == (reference.group(1) if reference else None), repr(text)


def test_extract_answer_takes_the_first_answer_or_with_last_the_last():
    assert extract_answer("<answer>1</answer> then <answer>2</answer>") == "1"
    assert extract_answer("<answer>1</answer> then <answer>2</answer>", last=True) == "2"
    assert extract_answer("<think>I could write <answer>3</answer></think><answer>4</answer>") == "3"
    assert extract_answer("<answer>a<answer>b</answer>c</answer>") == "a<answer>b"
    assert extract_answer("<answer>a<answer>b</answer>c</answer>", last=True) == "b</answer>c"
    assert extract_answer("</answer><answer>x</answer>") == "x"
    assert extract_answer("<answer>x<answer>") is None
    assert extract_answer("<answer></answer>") == ""
    assert extract_answer("no tags") is None
    assert extract_answer("</answer><answer>") is None
    assert extract_answer("</answer><answer>", last=True) is None


def test_parity_with_the_reference_rules_on_generated_cases():
    """tests/utils/format_parity_cases.jsonl: verdict, answer and R^o of the reference's rules
    (tests/utils/make_format_parity_cases.py)."""
    with open(os.path.join(os.path.dirname(__file__), "format_parity_cases.jsonl"), encoding="utf-8") as f:
        cases = [json.loads(line) for line in f]
    assert len(cases) > 600 and 150 < sum(case["format"] for case in cases) < len(cases) - 150
    for case in cases:
        response = case["response"].replace("$", "")
        assert has_think_answer_format(response) == case["format"], case
        assert extract_answer(response) == case["answer"], case
        assert outcome_reward(case["response"], case["truth"], "numerical") == case["reward"], case


def test_wrapped_ground_truth_takes_its_first_answer():
    assert outcome_reward(wrap("5"), "<answer>5</answer> or <answer>6</answer>", "numerical") == 1.0
    assert outcome_reward(wrap("6"), "<answer>5</answer> or <answer>6</answer>", "numerical") == 0.0


# --- shared rules: $, wrapped ground truth, length cap, unknown type --------------------------------------

def test_dollar_signs_are_stripped_from_response_and_solution():
    assert outcome_reward(wrap("$5$"), "5", "numerical") == 1.0
    assert outcome_reward(wrap("5"), "$$5$$", "numerical") == 1.0
    assert outcome_reward(wrap("$\\frac{1}{2}$"), "$0.5$", "numerical") == 1.0


def test_wrapped_ground_truth_is_unwrapped():
    assert outcome_reward(wrap("B"), "<answer>B</answer>", "multiple choice") == 1.0
    assert outcome_reward(wrap("Lee Harvey Oswald"), "<answer>Lee Harvey Oswald</answer>", "text") == 1.0


def test_answers_longer_than_the_cap_score_zero():
    padded = "5" + " " * 5000
    assert outcome_reward(wrap(padded), "5", "numerical") == 0.0
    assert outcome_reward(wrap(padded), "5", "numerical", max_answer_chars=6000) == 1.0
    assert outcome_reward(wrap("12345"), "12345", "numerical", max_answer_chars=4) == 0.0
    assert outcome_reward(wrap("12345"), "12345", "numerical", max_answer_chars=5) == 1.0


def test_unknown_problem_type_raises_input_error():
    with pytest.raises(InputError, match="problem_type 'Numerical'"):
        outcome_reward(wrap("5"), "5", "Numerical")


# --- numerical ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, truth, expected", [
    ("5", "5.0", 1.0),
    ("5.0", "5", 1.0),
    (" 5 ", "5", 1.0),
    ("1,000", "1000", 1.0),
    ("1e3", "1000", 1.0),
    ("-2", "2", 0.0),
    ("3.14", "3.14159", 0.0),
    ("0.1", "0.10000000001", 1.0),   # within the 1e-9 relative tolerance
    ("0.1", "0.1001", 0.0),
    ("\\frac{1}{2}", "0.5", 1.0),    # LaTeX goes through mathruler
    ("\\frac{1}{3}", "0.5", 0.0),
    ("50\\%", "50", 1.0),
    ("five", "5", 0.0),
    ("", "5", 0.0),
])
def test_numerical(answer, truth, expected):
    assert outcome_reward(wrap(answer), truth, "numerical") == expected


@pytest.mark.parametrize("answer", [
    "9**99999999", "99999999!", "((((9^9)^9)^9)^9)^9", "9^(99999999)", "5^-92}}{^5\\sqrt{", "2^(9*9*9*9*9*9*9*9)",
    "187}(\\pi,\\right)99999999", "[1]99999999", "(1 and 2)99999999", "1e999999\\sqrt{2}", "((x+y+2)^9)^9",
])
def test_numerical_never_hands_sympy_an_explosive_answer(answer):
    start = time.perf_counter()
    assert outcome_reward(wrap(answer), "5", "numerical") == 0.0
    assert time.perf_counter() - start < 2.0


def test_a_sympy_call_that_runs_too_long_is_cut_off_and_the_worker_restarts(monkeypatch):
    slow = "".join(f"(\\sqrt{{{p}}}+1)" for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37))  # > 20 s in sympy
    assert outcome_reward(wrap("\\frac{1}{2}"), "0.5", "numerical") == 1.0  # worker up before timing
    monkeypatch.setattr(outcome_module, "_SYMPY_TIMEOUT_S", 0.5)
    start = time.perf_counter()
    assert outcome_reward(wrap(slow), "5", "numerical") == 0.0
    assert time.perf_counter() - start < 2.0
    monkeypatch.undo()
    assert outcome_reward(wrap("\\frac{3}{4}"), "0.75", "numerical") == 1.0


def test_a_broken_mathruler_install_is_reported_not_scored_zero(monkeypatch):
    monkeypatch.setattr(outcome_module, "_SYMPY_WORKER_CODE", "import sys; sys.exit(1)")
    monkeypatch.setattr(outcome_module, "_SYMPY_WORKER", outcome_module._SympyWorker())
    assert outcome_reward(wrap("5"), "5", "numerical") == 1.0  # the fast path needs no worker
    with pytest.raises(outcome_module.MathWorkerError, match="mathruler worker did not start"):
        outcome_reward(wrap("\\frac{1}{2}"), "0.5", "numerical")


# --- multiple choice ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, truth, expected", [
    ("A", "A", 1.0),
    ("(B)", "B", 1.0),
    ("b", "B", 1.0),
    ("B.", "B", 1.0),
    ("B. blue", "B", 1.0),
    ("B) blue", "B", 1.0),
    ("A, C", "C,A", 1.0),
    ("A and C", "A, C", 1.0),
    ("A", "A, C", 0.0),
    ("A, C", "A", 0.0),
    ("B", "B. blue", 1.0),
    ("Blue", "B", 0.0),          # a capital inside a word is not an option letter
    ("I think A", "A", 0.0),
    ("C", "B", 0.0),
    ("", "B", 0.0),
    ("B", "", 0.0),
])
def test_multiple_choice(answer, truth, expected):
    assert outcome_reward(wrap(answer), truth, "multiple choice") == expected


def test_option_letters_rule():
    assert option_letters("[A], (C); D") == {"A", "C", "D"}
    assert option_letters("(D) the last one") == {"D"}
    assert option_letters("e.g. A") == set()
    assert option_letters("None of them") == set()


# --- OCR: exp(-WER) ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, truth, expected", [
    ("hello world", "hello world", 1.0),
    ("a b d", "a b c", math.exp(-1 / 3)),                   # one substitution in three words
    ("hello big world", "hello world", math.exp(-1 / 2)),   # one insertion against two words
    ("one  two\nthree", "one two three", 1.0),              # whitespace differences are not errors
    ("", "a b c", math.exp(-1.0)),                          # everything deleted: WER 1
    ("", "", 1.0),
    ("something", "", 0.0),
])
def test_ocr(answer, truth, expected):
    assert outcome_reward(wrap(answer), truth, "OCR") == pytest.approx(expected, abs=1e-12)


# --- free-form and text: mean ROUGE-1/2/L F ----------------------------------------------------------------

@pytest.mark.parametrize("problem_type", ["free-form", "text"])
@pytest.mark.parametrize("answer, truth, expected", [
    ("the cat", "the dog", (0.5 + 0.0 + 0.5) / 3),               # 1 of 2 unigrams, no bigram, LCS 1
    ("red blue green", "red blue yellow", (2 / 3 + 1 / 2 + 2 / 3) / 3),
    ("Two cats", "two cat", 1.0),                                # lower-cased and stemmed
    ("sunny day", "cold night", 0.0),
    ("", "cold night", 0.0),
])
def test_rouge_types(problem_type, answer, truth, expected):
    assert outcome_reward(wrap(answer), truth, problem_type) == pytest.approx(expected, abs=1e-12)


# --- parse_score -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("0.7", 0.7),
    (" 0.70 ", 0.7),
    ("<answer>1.0</answer>", 1.0),
    ("<answer> 0.4 </answer>", 0.4),
    ("<answer>score: 0.3</answer>", 0.3),
    ("<think>maybe 0.9</think><answer>0.2</answer>", 0.2),   # the answer beats earlier numbers
    ("<answer>0.1</answer><answer>0.6</answer>", 0.6),        # the last answer
    ("The score is 0.8.", 0.8),
    ("<answer>good</answer> 0.5", 0.5),                       # no number in the answer: first bare number
    ("1e-1", 0.1),
    (".5", 0.5),
    ("7", 1.0),                                               # clamped, as the reference does
    ("-0.2", 0.0),
    ("Qwen2.5 gives 0.6", 0.6),                               # digits glued to a word are not a score
    ("nan", None),
    ("inf", None),
    ("1e999", None),
    ("<answer></answer>", None),
    ("no score", None),
    ("", None),
])
def test_parse_score(text, expected):
    assert parse_score(text) == expected


def test_parse_score_never_raises_on_non_strings():
    assert parse_score(None) is None


# --- robustness --------------------------------------------------------------------------------------------

def _adversarial_strings(rng):
    fixed = [
        "<think>" * 5000, "<answer>" * 5000 + "x", "</answer>" * 5000, "<think></think>" * 3000,
        "<think>" + "</think> " * 5000 + "</answer>",
        wrap("9" * 4000), wrap("(" * 4000), wrap("\\frac{" * 600), wrap("a " * 2000), wrap("A" * 4000),
        wrap("\\sqrt{" * 300 + "2"), wrap("0.5" * 1000), wrap("\x00\ud800\U0010ffff"), "\ud800" * 100,
    ]
    tokens = ["<think>", "</think>", "<answer>", "</answer>", "$", "\\frac{1}{2}", "A", "(B)", ",", " ", "\n",
              "0.5", "7", "-", "e", "nan", "^", "!", "{", "}", "\u00e9", "\u4e2d", "\U0001f600", "\u2028", "\x00"]
    random_ones = []
    while len(fixed) + len(random_ones) < 2000:
        kind = rng.random()
        if kind < 0.4:
            text = "".join(rng.choice(tokens) for _ in range(rng.randint(0, 30)))
        elif kind < 0.8:
            answer = "".join(rng.choice(tokens[4:]) for _ in range(rng.randint(0, 12)))
            text = wrap(answer, think="".join(rng.choice(tokens) for _ in range(rng.randint(0, 5))))
        else:
            text = "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 60)))
        random_ones.append(text)
    return fixed + random_ones


def test_fuzz_never_raises_and_stays_in_unit_interval():
    rng = random.Random(1)
    truths = {"numerical": "0.5", "multiple choice": "B", "OCR": "hello world", "free-form": "a red ball",
              "text": "Denali"}
    for index, text in enumerate(_adversarial_strings(rng)):
        problem_type = PROBLEM_TYPES[index % len(PROBLEM_TYPES)]
        for solution in (truths[problem_type], text):
            reward = outcome_reward(text, solution, problem_type)
            assert isinstance(reward, float) and 0.0 <= reward <= 1.0, (text[:80], problem_type)
        score = parse_score(text)
        assert score is None or (isinstance(score, float) and 0.0 <= score <= 1.0)


@pytest.mark.parametrize("problem_type", PROBLEM_TYPES)
def test_200k_char_degenerate_responses_score_fast(problem_type):
    responses = [
        "<think>" + "</think> \n" * 20000 + "<answer>5</answer>",
        "<think>" + "x" * 200000 + "</think><answer>" + "word " * 800 + "</answer>",
        "<think>" * 30000,
        "<think>a</think>" + " " * 200000 + "<answer>B</answer>",
        "<think>" + "</think><answer>" * 12000 + "</answer>",
    ]
    for response in responses:
        assert len(response) >= 150000
        start = time.perf_counter()
        outcome_reward(response, "5", problem_type)
        parse_score(response)
        assert time.perf_counter() - start < 2.0, response[:40]
