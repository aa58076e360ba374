"""Judge-quality metrics against hand-computed values, and evaluate.py end to end (endpoint and in-process)."""
import importlib.util
import json
import math
import re

import pytest
from PIL import Image

from step1_reward_model import evaluate
from step1_reward_model.evaluate import average_ranks, judge_metrics, pairwise_accuracy, spearman
from tests.fake_judge import FakeJudge, reply, request_images, request_text

pytestmark = pytest.mark.timeout(120)

# Seven labelled rows over four questions; the last prediction did not parse.
LABELS = [1.0, 0.5, 0.0, 0.3, 0.3, 0.2, 0.8]
PREDICTIONS = [0.9, 0.9, 0.1, 0.4, 0.2, 0.7, None]
GROUPS = ["q1", "q1", "q1", "q2", "q2", "q3", "q3"]


def test_average_ranks_share_ties():
    assert average_ranks([3, 1, 4, 1, 5]) == [3, 1.5, 4, 1.5, 5]
    assert average_ranks([2, 2, 2]) == [2, 2, 2]


def test_spearman_by_hand():
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3, 4]: cov 4.5, var_x 4.5, var_y 5
    assert spearman([0.0, 0.5, 0.5, 1.0], [0.1, 0.3, 0.6, 0.9]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert spearman([0.1, 0.2, 0.3], [0.9, 0.5, 0.1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([0.1, 0.2, 0.3], [0.5, 0.5, 0.5]))  # a constant judge has no rank correlation


def test_pairwise_accuracy_by_hand():
    # q1: (1.0, 0.5) tied prediction -> 1/2, (1.0, 0.0) right, (0.5, 0.0) right; q2: equal labels, no pair;
    # q3: one prediction missing, no pair. 2.5 / 3.
    accuracy, pairs = pairwise_accuracy(LABELS, PREDICTIONS, GROUPS)
    assert pairs == 3 and accuracy == pytest.approx(2.5 / 3)
    accuracy, pairs = pairwise_accuracy([0.2, 0.8, 0.5], [0.6, 0.4, 0.5], ["a", "a", "a"])
    assert pairs == 3 and accuracy == 0.0  # every pair ordered against the labels


def test_judge_metrics_by_hand():
    metrics = judge_metrics(LABELS, PREDICTIONS, GROUPS)
    # parsed errors: -0.1, 0.4, 0.1, 0.1, -0.1, 0.5
    assert metrics["rows"] == 7 and metrics["parsed"] == 6
    assert metrics["parse_failure_rate"] == pytest.approx(1 / 7)
    assert metrics["mae"] == pytest.approx(1.3 / 6)
    assert metrics["rmse"] == pytest.approx(math.sqrt(0.45 / 6))
    # label ranks [6, 5, 1, 3.5, 3.5, 2], prediction ranks [5.5, 5.5, 1, 3, 2, 4]: cov 13.5, variances 17 and 17
    assert metrics["spearman"] == pytest.approx(13.5 / 17)
    assert metrics["pairwise_accuracy"] == pytest.approx(2.5 / 3) and metrics["pairs"] == 3
    means = {entry["interval"]: (entry["rows"], entry["mean_predicted"]) for entry in metrics["intervals"]}
    assert len(means) == 10
    assert means["[0.0, 0.1)"] == (1, pytest.approx(0.1))
    assert means["[0.2, 0.3)"] == (1, pytest.approx(0.7))
    assert means["[0.3, 0.4)"] == (2, pytest.approx(0.3))
    assert means["[0.5, 0.6)"] == (1, pytest.approx(0.9))
    assert means["[0.8, 0.9)"] == (1, None)  # its one row did not parse
    assert means["[0.9, 1.0]"] == (1, pytest.approx(0.9))
    assert means["[0.1, 0.2)"] == (0, None)
    table = evaluate.format_table(metrics)
    assert "MAE 0.2167" in table and "pairwise accuracy 0.8333 over 3 pairs" in table and "14.3%" in table


def write_heldout(folder):
    """The seven rows above as a labelled JSONL; question q1's rows carry one image, q3's two."""
    Image.new("RGB", (16, 16), (255, 0, 0)).save(folder / "red.png")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(folder / "blue.png")
    images = {"q1": ["red.png"], "q2": [], "q3": ["red.png", "blue.png"]}
    rows = [{"id": f"r{i}", "question": f"question {group}", "response": f"<think>row {i}</think><answer>x</answer>",
             "images": images[group], "score": label, "status": "scored"}
            for i, (label, group) in enumerate(zip(LABELS, GROUPS))]
    path = folder / "heldout.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def judge_by_row(body, index):
    """Answers PREDICTIONS[i] for "row i", in a few of the formats judges write; no number for the last row."""
    row = int(re.search(r"row (\d+)", request_text(body)).group(1))
    prediction = PREDICTIONS[row]
    return reply("I cannot tell" if prediction is None else ["<answer>{}</answer>", "{}", "score: {}"][row % 3].format(prediction))


def test_evaluate_through_an_endpoint_matches_the_hand_computed_metrics(tmp_path, capsys):
    data = write_heldout(tmp_path)
    with FakeJudge(judge_by_row) as judge:
        metrics = evaluate.main(["--data", str(data), "--judge-url", judge.url, "--output-dir", str(tmp_path / "out")])
    assert metrics == json.loads((tmp_path / "out" / "metrics.json").read_text(), parse_constant=float)
    assert metrics["mae"] == pytest.approx(1.3 / 6) and metrics["spearman"] == pytest.approx(13.5 / 17)
    assert metrics["pairwise_accuracy"] == pytest.approx(2.5 / 3) and metrics["parse_failure_rate"] == pytest.approx(1 / 7)
    predictions = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [p["predicted"] for p in predictions] == PREDICTIONS and [p["label"] for p in predictions] == LABELS
    assert predictions[-1]["judge_text"] == "I cannot tell"
    by_row = {int(re.search(r"row (\d+)", request_text(body)).group(1)): body for body in judge.requests}
    assert [img.getpixel((0, 0)) for img in request_images(by_row[5])] == [(255, 0, 0), (0, 0, 255)]
    assert request_images(by_row[3]) == [] and "<image> question q1" in request_text(by_row[0])
    assert {body["model"] for body in judge.requests} == {"thinking-reward-model"}
    assert "pairwise accuracy 0.8333 over 3 pairs" in capsys.readouterr().out


def test_evaluate_in_process_scores_with_the_model(tmp_path, tiny_assets):
    data = write_heldout(tmp_path)
    metrics = evaluate.main(["--data", str(data), "--model-path", tiny_assets["model"], "--max-samples", "3",
                             "--batch-size", "2", "--max-new-tokens", "4", "--output-dir", str(tmp_path / "out")])
    predictions = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == metrics["rows"] == 3
    assert all(isinstance(p["judge_text"], str) for p in predictions)  # the untrained model says something
    assert metrics["parsed"] == sum(p["predicted"] is not None for p in predictions)


def test_plot_writes_a_png_or_names_the_missing_package(tmp_path, capsys):
    data = write_heldout(tmp_path)
    argv = ["--data", str(data), "--judge-url", "http://127.0.0.1:9/v1", "--output-dir", str(tmp_path / "out"), "--plot"]
    if importlib.util.find_spec("matplotlib") is None:
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(argv)
        assert exit_info.value.code == 2 and "--plot needs matplotlib" in capsys.readouterr().err
        return
    with FakeJudge(judge_by_row) as judge:
        argv[argv.index("http://127.0.0.1:9/v1")] = judge.url
        evaluate.main(argv)
    assert (tmp_path / "out" / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_judge_must_be_named_once(tmp_path, capsys):
    data = write_heldout(tmp_path)
    with pytest.raises(SystemExit):
        evaluate.main(["--data", str(data), "--output-dir", str(tmp_path / "out")])
    assert "one of the arguments --model-path --judge-url is required" in capsys.readouterr().err
