"""annotate.py end to end against a real local judge server: labels, failures, resume, bad input."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import jsonlines
import pytest
from PIL import Image

from step1_reward_model import annotate
from tests.fake_judge import FakeJudge, reply, request_images, request_text, status
from tests.helpers import closed_port
from sophiavl.utils.cli import InputError

pytestmark = pytest.mark.timeout(60)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def question_number(body):
    return int(re.search(r"question (\d+)", request_text(body)).group(1))


def score_by_question(body, index):
    """Score 0.N for "question N", so each label can be checked against its row."""
    return reply(f"<answer>0.{question_number(body) % 10}</answer>")


def write_rollouts(folder, n=6):
    """n rows: row 0 has two images, odd rows none, even rows one; row 1 has an explicit id."""
    os.makedirs(folder / "img", exist_ok=True)
    colours = ["red", "green", "blue", "white", "black", "yellow", "cyan", "magenta"]
    rows = []
    for i in range(n):
        images = []
        for k in range(2 if i == 0 else (0 if i % 2 else 1)):
            name = f"img/{i}_{k}.png"
            Image.new("RGB", (8, 8), colours[(i + k) % len(colours)]).save(folder / name)
            images.append(name)
        row = {"question": f"question {i}", "response": f"<think>step {i}</think><answer>{i}</answer>",
               "images": images, "problem_type": "numerical", "answer": str(i)}
        if i == 1:
            row["id"] = "explicit-1"
        rows.append(row)
    path = folder / "rollouts.jsonl"
    with jsonlines.open(path, "w") as writer:
        writer.write_all(rows)
    return path, rows


def run(inp, out, judge_url, *extra):
    return annotate.main(["--input", str(inp), "--output", str(out), "--judge-url", judge_url,
                          "--judge-model", "judge", "--timeout", "5", "--backoff", "0.01", *extra])


def read(path):
    with jsonlines.open(path) as reader:
        return list(reader)


def test_end_to_end_labels_every_row_with_its_own_images(tmp_path, capsys):
    inp, rows = write_rollouts(tmp_path)
    out = tmp_path / "labels.jsonl"
    with FakeJudge(score_by_question) as judge:
        counts = run(inp, out, judge.url, "--max-concurrency", "3")
    assert counts == {"scored": 6, "failed": 0, "skipped": 0}
    assert capsys.readouterr().out.strip().splitlines()[-1] == "scored 6 / failed 0 / skipped 0"
    labels = read(out)
    assert [label["question"] for label in labels] == [f"question {i}" for i in range(6)]  # input order
    for i, label in enumerate(labels):
        assert label["score"] == pytest.approx(i / 10) and label["status"] == "scored" and label["error"] is None
        assert label["judge_text"] == f"<answer>0.{i}</answer>"
        assert label["problem_type"] == "numerical" and label["answer"] == str(i)  # passthrough
        assert label["images"] == rows[i]["images"]
    assert labels[1]["id"] == "explicit-1"
    assert labels[0]["id"] == annotate.stable_id(rows[0]) and len(labels[0]["id"]) == 16
    by_question = {question_number(body): body for body in judge.requests}
    assert len(judge.requests) == 6
    assert [img.getpixel((0, 0)) for img in request_images(by_question[0])] == [(255, 0, 0), (0, 128, 0)]
    assert [img.getpixel((0, 0)) for img in request_images(by_question[2])] == [(0, 0, 255)]
    assert request_images(by_question[1]) == []


def test_failed_rows_are_recorded_then_retried_on_rerun(tmp_path, capsys):
    inp, _ = write_rollouts(tmp_path)
    out = tmp_path / "labels.jsonl"

    def half_broken(body, index):  # odd questions get a 500 every time
        return status(500) if question_number(body) % 2 else score_by_question(body, index)

    with FakeJudge(half_broken) as judge:
        assert run(inp, out, judge.url, "--max-retries", "1") == {"scored": 3, "failed": 3, "skipped": 0}
    assert len(judge.requests) == 3 + 3 * 2  # the failing rows were tried twice each
    first = {label["question"]: label for label in read(out)}
    assert len(first) == 6
    for i in (1, 3, 5):
        failed = first[f"question {i}"]
        assert failed["status"] == "failed" and failed["score"] is None  # failed, never 0
        assert failed["error"].startswith("gave up after 2 attempts: HTTP 500")

    with FakeJudge(score_by_question) as judge:
        assert run(inp, out, judge.url) == {"scored": 3, "failed": 0, "skipped": 3}
    assert sorted(question_number(body) for body in judge.requests) == [1, 3, 5]  # only the failed ones
    assert capsys.readouterr().out.strip().splitlines()[-1] == "scored 3 / failed 0 / skipped 3"
    labels = read(out)
    assert len(labels) == 6 and len({label["id"] for label in labels}) == 6
    assert all(label["status"] == "scored" for label in labels)
    assert [label["score"] for label in labels] == pytest.approx([i / 10 for i in range(6)])

    with FakeJudge(score_by_question) as judge:  # a third run has nothing left to do
        assert run(inp, out, judge.url) == {"scored": 0, "failed": 0, "skipped": 6}
    assert judge.requests == [] and read(out) == labels


def test_unreachable_judge_fails_every_row_within_the_bound(tmp_path):
    inp, _ = write_rollouts(tmp_path, n=3)
    out = tmp_path / "labels.jsonl"
    start = time.monotonic()
    counts = run(inp, out, f"http://127.0.0.1:{closed_port()}/v1/chat/completions", "--max-retries", "2")
    assert time.monotonic() - start < 10
    assert counts == {"scored": 0, "failed": 3, "skipped": 0}
    assert all(label["status"] == "failed" and label["score"] is None and "connection error" in label["error"]
               for label in read(out))


def test_unparsable_judge_output_is_failed_with_its_text(tmp_path):
    inp, _ = write_rollouts(tmp_path, n=2)
    out = tmp_path / "labels.jsonl"
    with FakeJudge(lambda body, index: reply("looks fine to me")) as judge:
        assert run(inp, out, judge.url) == {"scored": 0, "failed": 2, "skipped": 0}
    assert len(judge.requests) == 2  # not retried
    assert {label["judge_text"] for label in read(out)} == {"looks fine to me"}


def test_resume_after_a_killed_run_loses_and_duplicates_nothing(tmp_path):
    inp, _ = write_rollouts(tmp_path, n=10)
    out = tmp_path / "labels.jsonl"
    with FakeJudge(score_by_question, delay_s=0.3) as judge:
        proc = subprocess.Popen(
            [sys.executable, os.path.join(REPO, "step1_reward_model", "annotate.py"), "--input", str(inp),
             "--output", str(out), "--judge-url", judge.url, "--judge-model", "judge", "--max-concurrency", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert 3 <= len(written) < 10  # killed mid-run, with some rows on disk
    with open(out, "a") as f:  # and a row cut short, as a kill during a write leaves it
        f.write('{"id": "half a row", "sco')

    with FakeJudge(score_by_question) as judge:
        counts = run(inp, out, judge.url)
    assert counts == {"scored": 10 - len(written), "failed": 0, "skipped": len(written)}
    assert len(judge.requests) == 10 - len(written)
    labels = read(out)
    assert sorted(label["question"] for label in labels) == sorted(f"question {i}" for i in range(10))
    assert len({label["id"] for label in labels}) == 10 and all(label["status"] == "scored" for label in labels)


def test_images_resolve_against_image_base(tmp_path):
    inp, _ = write_rollouts(tmp_path, n=3)
    os.makedirs(tmp_path / "base")
    os.rename(tmp_path / "img", tmp_path / "base" / "img")
    with pytest.raises(InputError, match=r"rollouts.jsonl:1: image not found"):
        annotate.read_input(str(inp), None)  # default: the input file's folder
    items = annotate.read_input(str(inp), str(tmp_path / "base"))
    assert [paths for _, paths, _ in items] == [
        [str(tmp_path / "base" / "img" / "0_0.png"), str(tmp_path / "base" / "img" / "0_1.png")], [],
        [str(tmp_path / "base" / "img" / "2_0.png")]]


def test_identical_rows_are_labelled_once_and_conflicting_ids_rejected(tmp_path):
    row = {"question": "q", "response": "<answer>1</answer>", "images": []}
    inp = tmp_path / "in.jsonl"
    with jsonlines.open(inp, "w") as writer:
        writer.write_all([row, row])
    assert len(annotate.read_input(str(inp), None)) == 1
    with jsonlines.open(inp, "w") as writer:
        writer.write_all([{**row, "id": "a"}, {**row, "id": "a", "response": "other"}])
    with pytest.raises(InputError, match=r"in.jsonl:2: id 'a' repeats with different content"):
        annotate.read_input(str(inp), None)


@pytest.mark.parametrize("content, message", [
    ('{"question": "q", "response": "r"}\n{"question": "q2", "resp\n', r"in.jsonl:2: not a valid UTF-8 JSON line"),
    ('{"question": "q"}\n', r"in.jsonl:1: missing or non-string field 'response'"),
    ('["not", "a", "row"]\n', r"in.jsonl:1: a row must be a JSON object"),
    ('{"question": "q", "response": "r", "images": ["missing.png"]}\n', r"in.jsonl:1: image not found: .*missing.png"),
    ('{"question": "q", "response": "r", "images": [3]}\n', r"in.jsonl:1: 'images' must be a list of paths"),
])
def test_bad_input_names_file_and_line_and_exits_2(tmp_path, capsys, content, message):
    inp = tmp_path / "in.jsonl"
    inp.write_text(content)
    out = tmp_path / "labels.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        run(inp, out, "http://127.0.0.1:9/v1")
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()  # nothing a later run could mistake for results


def test_corrupt_image_stops_the_run_naming_the_row(tmp_path, capsys):
    inp, _ = write_rollouts(tmp_path, n=3)
    (tmp_path / "img" / "2_0.png").write_bytes(b"\x89PNG not really")
    with FakeJudge(score_by_question) as judge, pytest.raises(SystemExit) as exit_info:
        run(inp, tmp_path / "labels.jsonl", judge.url, "--max-concurrency", "1")
    assert exit_info.value.code == 2
    assert re.search(r"rollouts.jsonl:3: cannot read image .*2_0.png", capsys.readouterr().err)


@pytest.mark.parametrize("flags, message", [
    (["--max-concurrency", "0"], "--max-concurrency must be >= 1"),
    (["--timeout", "0"], "--timeout must be > 0"),
    (["--max-retries", "-1"], "--max-retries must be >= 0"),
])
def test_nonsensical_flags_are_rejected(tmp_path, capsys, flags, message):
    inp, _ = write_rollouts(tmp_path, n=1)
    with pytest.raises(SystemExit) as exit_info:
        run(inp, tmp_path / "labels.jsonl", "http://127.0.0.1:9/v1", *flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bad_judge_url_is_an_input_error(tmp_path, capsys):
    inp, _ = write_rollouts(tmp_path, n=1)
    with pytest.raises(SystemExit):
        run(inp, tmp_path / "labels.jsonl", "localhost:8000")
    assert "error: judge/TRM URL 'localhost:8000'" in capsys.readouterr().err
