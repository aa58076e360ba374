"""Rule-based filtering and per-interval sampling of judge labels, with hand-computed counts."""
import json
import re

import jsonlines
import pytest

from step1_reward_model import balance
from step1_reward_model.balance import balance as balance_rows
from step1_reward_model.balance import filter_rows, sample_buckets, score_bucket

pytestmark = pytest.mark.timeout(60)


def label(question, score, response=None, **extra):
    response = f"<think>{question}</think><answer>x</answer>" if response is None else response
    return {"id": f"{question}|{response}", "question": question, "response": response, "score": score,
            "status": "scored", **extra}


def noisy_rows():
    return [
        label("a", 0.5),
        {**label("b", None), "status": "failed"},               # not_scored
        label("c", None),                                       # not_scored: status says scored, score missing
        {**label("d", 0.4), "status": "failed"},                # not_scored
        label("e", float("nan")),                               # not_scored
        label("f", 0.3, response="   \n"),                      # empty_response
        label("g", 0.3, response=""),                           # empty_response
        label("h", 0.3, response="<think>cut off here"),        # truncated: no </answer>
        label("i", 0.3, response="<think>t</think><answer>1"),  # truncated
        label("j", 0.8, truncated=True),                        # truncated: flagged by the rollout
        label("a", 0.9),                                        # duplicate of row 0 (score differs, same text)
        label("a", 0.5, response="<think>other</think><answer>y</answer>"),  # same question, new response: kept
        label("k", 1.0),
    ]


def test_each_rule_is_counted_once_in_order():
    kept, counts = filter_rows(noisy_rows())
    assert counts == {"not_scored": 4, "empty_response": 2, "truncated": 3, "duplicate": 1}
    assert [(row["question"], row["score"]) for row in kept] == [("a", 0.5), ("a", 0.5), ("k", 1.0)]


def test_a_failed_row_does_not_shadow_a_later_good_duplicate():
    rows = [{**label("a", None), "status": "failed"}, label("a", 0.6)]
    kept, counts = filter_rows(rows)
    assert counts == {"not_scored": 1, "empty_response": 0, "truncated": 0, "duplicate": 0}
    assert kept == [rows[1]]


@pytest.mark.parametrize("score, bucket", [
    (0.0, 0), (0.04, 0), (0.05, 0),  # round(0.5) = 0: Python rounds halves to even
    (0.1, 1), (0.15, 2), (0.25, 2),  # 10*0.15 = 1.5 -> 2 and 10*0.25 = 2.5 -> 2
    (0.3, 3), (0.35, 4), (0.6, 6), (0.7, 7),
    (0.9, 9), (0.95, 9), (1.0, 9),  # 1.0 joins the last interval [0.9, 1.0]
])
def test_bucket_is_round_of_ten_times_score(score, bucket):
    assert score_bucket(score) == bucket


def test_scores_that_floor_would_misplace():
    # Scores that went through arithmetic (e.g. averaged or rescaled labels) sit just under k/10.
    assert 0.7 - 0.3 == 0.39999999999999997 and score_bucket(0.7 - 0.3) == 4  # floor(3.9999999999999996) = 3
    assert sum([0.1] * 8) == 0.7999999999999999 and score_bucket(sum([0.1] * 8)) == 8


def spread_rows():
    """Per interval i: 3*i + 1 rows, i.e. counts 1, 4, 7, ..., 28; 1.0 adds 2 rows to interval 9."""
    rows = []
    for bucket in range(10):
        rows += [label(f"q{bucket}-{k}", bucket / 10) for k in range(3 * bucket + 1)]
    rows += [label("top-0", 1.0), label("top-1", 1.0)]
    return rows


def test_cap_is_respected_and_rows_never_duplicated():
    rows = spread_rows()
    sampled, before, after = sample_buckets(rows, cap=10, seed=0)
    assert before == [1, 4, 7, 10, 13, 16, 19, 22, 25, 30]
    assert after == [1, 4, 7, 10, 10, 10, 10, 10, 10, 10]
    assert len(sampled) == 82 and len({row["id"] for row in sampled}) == 82
    positions = [rows.index(row) for row in sampled]
    assert positions == sorted(positions)  # kept rows stay in input order
    assert [r["question"] for r in sampled if score_bucket(r["score"]) <= 3] == \
           [r["question"] for r in rows if score_bucket(r["score"]) <= 3]  # under the cap: all kept


def test_sampling_is_deterministic_by_seed():
    rows = spread_rows()
    ids = lambda seed: [row["id"] for row in sample_buckets(rows, cap=5, seed=seed)[0]]
    assert ids(1) == ids(1)
    assert ids(1) != ids(2)


def test_no_cap_keeps_everything():
    rows = spread_rows()
    sampled, before, after = sample_buckets(rows, cap=None, seed=0)
    assert sampled == rows and before == after


def test_report_flags_intervals_under_min_without_duplicating():
    sampled, report = balance_rows(spread_rows() + noisy_rows(), cap=10, min_per_interval=8, seed=3)
    assert report["input_rows"] == 147 + 13
    assert report["dropped"] == {"not_scored": 4, "empty_response": 2, "truncated": 3, "duplicate": 1}
    assert report["after_filter"] == 147 + 3
    # noisy_rows adds two rows scored 0.5 (interval 5) and one scored 1.0 (interval 9)
    assert [i["before"] for i in report["intervals"]] == [1, 4, 7, 10, 13, 18, 19, 22, 25, 31]
    assert [i["after"] for i in report["intervals"]] == [1, 4, 7, 10, 10, 10, 10, 10, 10, 10]
    assert [i["below_min"] for i in report["intervals"]] == [True, True, True] + [False] * 7
    assert report["intervals"][0]["interval"] == "[0.0, 0.1)" and report["intervals"][9]["interval"] == "[0.9, 1.0]"
    assert report["output_rows"] == len(sampled) == 82


def test_cli_writes_rows_report_and_table(tmp_path, capsys):
    inp, out = tmp_path / "labels.jsonl", tmp_path / "balanced.jsonl"
    with jsonlines.open(inp, "w") as writer:
        writer.write_all(spread_rows() + noisy_rows())
    args = ["--input", str(inp), "--output", str(out), "--cap", "10", "--min", "8", "--seed", "3"]
    report = balance.main(args)
    rows = list(jsonlines.open(out))
    assert len(rows) == 82
    assert json.loads((tmp_path / "balanced.report.json").read_text()) == report
    table = capsys.readouterr().out
    assert re.search(r"\[0\.0, 0\.1\)\s+1\s+1\s+below --min", table)
    assert re.search(r"\[0\.9, 1\.0\]\s+31\s+10\n", table)
    assert "dropped: not_scored 4, empty_response 2, truncated 3, duplicate 1" in table
    balance.main(args)  # same seed, same output
    assert list(jsonlines.open(out)) == rows


@pytest.mark.parametrize("content, flags, message", [
    ('{"response": "r", "score": 0.5}\nnot json\n', [], r"labels.jsonl:2: not a valid UTF-8 JSON line"),
    ('{"question": "q", "score": 0.5}\n', [], r"labels.jsonl:1: expected an annotation row"),
    ('{"response": "r", "score": 0.5}\n', ["--cap", "0"], r"--cap must be >= 1"),
    ('{"response": "r", "score": 0.5}\n', ["--cap", "5", "--min", "6"], r"--min 6 is above --cap 5"),
])
def test_bad_input_exits_2_naming_the_line_or_flag(tmp_path, capsys, content, flags, message):
    inp, out = tmp_path / "labels.jsonl", tmp_path / "balanced.jsonl"
    inp.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        balance.main(["--input", str(inp), "--output", str(out), *flags])
    assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert not out.exists()
