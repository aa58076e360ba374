"""The shortcut families: the shortcut's answer is right on most training rows and on no held-out row, the oracle
scores its trace below the correct chain on every row, and the warm start teaches it only where it exists."""
import random
from collections import defaultdict

import pytest

from sophiavl.demo.shortcut_tasks import TINT, TRAIN_AGREEMENT, WORLDS
from sophiavl.demo.synthetic_tasks import COLOURS, make_rows
from sophiavl.demo.trace_quality import oracle_score
from sophiavl.demo.warm_start import confused, target_text


@pytest.fixture(scope="module")
def rows():
    return {split: make_rows(n, seed=0, split=split, tasks=WORLDS["shortcut"]) for split, n in (("train", 1200),
                                                                                                 ("test", 400))}


def family(row):
    return row["data_source"].split("/")[-1]


def heuristic_accuracy(pairs) -> dict:
    hits = defaultdict(list)
    for row, _ in pairs:
        if "shortcut" in row:
            hits[family(row)].append(row["shortcut"]["answer"] == row["solution"][8:-9])
    return {name: sum(h) / len(h) for name, h in hits.items()}


def test_the_shortcut_pays_in_training_and_never_on_held_out_rows(rows):
    train, test = heuristic_accuracy(rows["train"]), heuristic_accuracy(rows["test"])
    assert set(train) == set(test) == {"tint", "hint_sum"}
    for name in train:  # 300 training rows each: 0.9 +- 0.017
        assert 0.85 <= train[name] <= 0.95, (name, train[name])
        assert test[name] == 0.0  # chance would be 1/4 (tint's options) or ~1/19 (a sum of two digits)
    assert TRAIN_AGREEMENT == 0.9
    assert [family(row) for row, _ in rows["train"][:4]] == ["colour", "tint", "arithmetic", "hint_sum"]


def test_images_and_questions(rows):
    for row, image in rows["test"][:40]:
        if family(row) == "tint":
            tint = tuple(round(TINT * c + (1 - TINT) * 255) for c in COLOURS[row["facts"]["background"]])
            assert image.getpixel((0, 0)) == tint and row["facts"]["background"] != row["facts"]["colour"]
            assert COLOURS[row["facts"]["colour"]] in image.getdata()
            assert row["problem"] == "What colour is the shape?"  # the control family's question
        if family(row) == "hint_sum":
            a, b, hint = row["facts"]["a"], row["facts"]["b"], row["facts"]["hint"]
            assert row["problem"] == f"What is {a} + {b}? A student says {hint}." and 1 <= abs(hint - a - b) <= 2
        if family(row) == "colour":
            assert image.getpixel((0, 0)) == (255, 255, 255)


def test_the_oracle_scores_the_shortcut_below_the_correct_chain_on_every_row(rows):
    for row, _ in rows["train"] + rows["test"]:
        if "shortcut" not in row:
            continue
        correct = f"<think>{'. '.join(row['reasoning'])}.</think><answer>{row['solution'][8:-9]}</answer>"
        shortcut = f"<think>{'. '.join(row['shortcut']['reasoning'])}.</think><answer>{row['shortcut']['answer']}</answer>"
        reasoning, answer = confused(row)
        assert oracle_score(correct, row) == 1.0
        assert oracle_score(shortcut, row) == 0.6  # true observations, then a step that does not follow
        assert oracle_score(f"<think>{'. '.join(reasoning)}.</think><answer>{answer}</answer>", row) in (0.5, 0.6)


def test_the_warm_start_writes_the_shortcut_only_where_there_is_one(rows):
    rng = random.Random(0)
    for row, _ in rows["train"][:40]:
        text = target_text(row, rng, correct_fraction=1.0, shortcut_fraction=1.0)
        if "shortcut" in row:
            assert text == f"<think>{'. '.join(row['shortcut']['reasoning'])}.</think><answer>{row['shortcut']['answer']}</answer>"
        else:
            assert text == f"<think>{'. '.join(row['reasoning'])}.</think><answer>{row['solution'][8:-9]}</answer>"
    # without shortcut traces, the v1 warm start's random stream is unchanged (same draws, same targets)
    a, b = random.Random(5), random.Random(5)
    plain = [{k: v for k, v in row.items() if k != "shortcut"} for row, _ in rows["train"][:40]]
    assert [target_text(r, a, 0.45) for r in plain] == [target_text(r, b, 0.45, shortcut_fraction=0.7) for r in plain]
