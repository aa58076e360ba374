"""Step 3 on benchmark TSVs in VLMEvalKit's format (written here the way VLMEvalKit's files are: pandas, tab-separated,
base64 PNGs, option columns, hint, category / l2-category, image-by-reference and multi-image rows), run end to end on
scripted models. Expected scores are worked out by hand from the rows."""
import base64
import csv
import io
import json
import math
import os
import sys

import pandas as pd
import pytest

import sophiavl.utils.generation
from step3_eval.main import main
from step3_eval.metrics import (MME_COGNITION, MME_PERCEPTION, MME_SCORE, RELAXED_ACCURACY, RULE_BASED, mme_score,
                                relaxed_correctness, row_scores, yes_no)
from step3_eval.vlmeval_tsv import read_vlmeval_tsv
from tests.scripted_model import scripted_model
from tests.helpers import free_port, run_script
from sophiavl.utils.cli import InputError
from sophiavl.utils.prompts import EVAL_SYSTEM_PROMPT, QUESTION_TEMPLATE, TYPE_TEMPLATE, policy_messages

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAIN = os.path.join(REPO, "step3_eval", "main.py")
COMMON = ["--max-new-tokens", "12"]
E = math.exp(-1)  # exp(-WER) for one substituted word


def png(color, size=56):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data):
    return base64.b64encode(data).decode("ascii")


RED, GREEN, BLUE = png("red"), png("green"), png("blue")

# MMBench-like: the scripted reply "B" is right on pick_b, wrong on pick_a, half right on mixed. Row 101 refers to
# row 100's image, row 103 holds two images, row 106's problem_type column makes "b" an OCR answer (exp(-WER) of
# "B" against "b" is exp(-1); inferred free-form it would score the ROUGE mean 2/3).
MMB = [
    dict(index=100, question="Which color is the square?", hint="Look at the centre.", A="red", B="green", C="blue",
         D="", answer="B", category="pick_b", **{"l2-category": "reasoning"}, image=b64(RED), problem_type=""),
    dict(index=101, question="Same picture: which color?", hint="", A="red", B="green", C="", D="", answer="B",
         category="pick_b", **{"l2-category": "reasoning"}, image="100", problem_type=""),
    dict(index=102, question="Pick one.", hint="", A="blue", B="red", C="", D="", answer="A", category="pick_a",
         **{"l2-category": "perception"}, image=b64(BLUE), problem_type=""),
    dict(index=103, question="Which picture is green?", hint="Two pictures.", A="first", B="both", C="second", D="none",
         answer="C", category="mixed", **{"l2-category": "perception"}, image=str([b64(RED), b64(GREEN)]),
         problem_type=""),
    dict(index=104, question="Is it green?", hint="", A="no", B="yes", C="", D="", answer="B", category="mixed",
         **{"l2-category": "perception"}, image=b64(GREEN), problem_type=""),
    dict(index=105, question="How many squares?", hint="", A="", B="", C="", D="", answer="7", category="numeric",
         **{"l2-category": "reasoning"}, image="102", problem_type=""),
    dict(index=106, question="Read the letter.", hint="", A="", B="", C="", D="", answer="b", category="open",
         **{"l2-category": "reasoning"}, image=b64(RED), problem_type="OCR"),
]
MMB_SCORES = {100: 1.0, 101: 1.0, 102: 0.0, 103: 0.0, 104: 1.0, 105: 0.0, 106: E}
# image_path TSV (no image column), registered in a dataset_info.json; paths relative to its image_base_path
PATHS = [
    dict(index=1, question="What is 3+4?", answer="7", image_path="a.png"),
    dict(index=2, question="Which is green?", A="first", B="second", answer="B", image_path="['a.png', 'b.png']"),
]
PATHS_SCORES = [0.0, 1.0]


def write_tsv(path, records):
    """As VLMEvalKit's files are written: pandas, tab-separated, no index column."""
    pd.DataFrame(records).to_csv(path, sep="\t", index=False)
    return str(path)


def run_eval(out_dir, *flags):
    main(["--output-dir", str(out_dir), *COMMON, *flags])
    with open(os.path.join(out_dir, "summary.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tsv")
    (folder / "imgs").mkdir()
    (folder / "imgs" / "a.png").write_bytes(RED)
    (folder / "imgs" / "b.png").write_bytes(GREEN)
    write_tsv(folder / "paths.tsv", [{"A": "", "B": "", **r} for r in PATHS])
    with open(folder / "dataset_info.json", "w") as f:
        json.dump({"paths_tsv": {"file_path": "paths.tsv", "image_base_path": "imgs"}}, f)
    return {"mmb": write_tsv(folder / "MMB_tiny.tsv", MMB), "registry": str(folder / "dataset_info.json"),
            "folder": folder}


@pytest.fixture(scope="module")
def model_b(tiny_assets, tmp_path_factory):
    return scripted_model(tiny_assets["model"], str(tmp_path_factory.mktemp("b")), reply="<think>x</think><answer>B</answer>")


def b_run_flags(model, files):
    return ["--model-path", model, "--data-path", "paths_tsv", "--registry", files["registry"],
            "--benchmark-tsv", files["mmb"]]


@pytest.fixture(scope="module")
def hf_run(model_b, files, tmp_path_factory):
    """The reply-B model on the registered path TSV, then MMB_tiny; records the text of every prompt."""
    out_dir = tmp_path_factory.mktemp("hf") / "out"
    seen = []
    real_chat_inputs = sophiavl.utils.generation.chat_inputs

    def recording_chat_inputs(processor, *args, **kwargs):
        inputs = real_chat_inputs(processor, *args, **kwargs)
        pad = processor.tokenizer.pad_token  # batches are padded; the prompts are what is between the pads
        seen.extend(text.replace(pad, "") for text in processor.tokenizer.batch_decode(inputs["input_ids"]))
        return inputs

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sophiavl.utils.generation, "chat_inputs", recording_chat_inputs)
        summary = run_eval(out_dir, *b_run_flags(model_b, files), "--batch-size", "4")
    return {"out": out_dir, "summary": summary, "prompts": seen}


def test_reader_gives_load_rows_rows_with_options_hint_types_and_images(files):
    rows = read_vlmeval_tsv(files["mmb"], "MMB_tiny")
    assert [row["id"] for row in rows] == [str(r["index"]) for r in MMB]
    assert {row["dataset"] for row in rows} == {row["data_source"] for row in rows} == {"MMB_tiny"}
    assert rows[0]["prompt"] == "Which color is the square?" and rows[0]["answer"] == "B"
    assert rows[0]["options"] == ["A. red", "B. green", "C. blue"] and rows[0]["hint"] == "Look at the centre."
    assert rows[1]["options"] == ["A. red", "B. green"] and rows[1]["hint"] is None
    assert [row["problem_type"] for row in rows] == ["multiple choice"] * 5 + ["numerical", "OCR"]
    images = [[ref["bytes"] for ref in row["images"]] for row in rows]
    assert images == [[RED], [RED], [BLUE], [RED, GREEN], [GREEN], [BLUE], [RED]]
    assert all(ref["path"] is None for row in rows for ref in row["images"])
    assert [row["image_key"] for row in rows] == ["100", "100", "102", "103", "104", "102", "106"]
    assert list(rows[0]["source"]) == [c for c in MMB[0] if c != "image"]
    assert rows[3]["source"]["l2-category"] == "perception" and rows[0]["source"]["D"] == ""


def test_reader_resolves_image_paths_against_the_base_folder(files):
    rows = read_vlmeval_tsv(str(files["folder"] / "paths.tsv"), "paths", str(files["folder"] / "imgs"))
    a, b = str(files["folder"] / "imgs" / "a.png"), str(files["folder"] / "imgs" / "b.png")
    assert [[ref["path"] for ref in row["images"]] for row in rows] == [[a], [a, b]]
    assert [row["problem_type"] for row in rows] == ["numerical", "multiple choice"]


def test_hint_goes_before_the_question_as_vlmevalkit_prints_it():
    messages = policy_messages("Which color?", "multiple choice", ["A. red", "B. green"], num_images=1,
                               template="eval", hint="Look closely.")
    assert messages[0] == {"role": "system", "content": EVAL_SYSTEM_PROMPT}
    assert messages[1]["content"][1]["text"] == ("Hint: Look closely.\nQuestion: Which color?\nOptions:\nA. red\n"
                                                 "B. green\nPlease select the correct answer from the options above.")
    train = policy_messages("Which color?", "multiple choice", ["A. red", "B. green"], hint="Look closely.")
    assert train[0]["content"][0]["text"] == (QUESTION_TEMPLATE.replace("{Question}", "Hint: Look closely.\nWhich "
                                              "color?A. red; B. green") + TYPE_TEMPLATE["multiple choice"])
    assert policy_messages("Q", "numerical", template="eval", hint="H")[1]["content"][0]["text"] == "Hint: H\nQ"


def malformed(tmp_path, case):
    """(TSV path, expected message pieces) for one malformed file."""
    good = dict(index=0, question="Q?", answer="A", A="x", B="y", image=b64(RED))
    second = dict(good, index=1, image="0")
    rows, expected = {
        "no question column": ([{k: v for k, v in good.items() if k != "question"}], ["no 'question' column"]),
        "no answer column": ([{k: v for k, v in good.items() if k != "answer"}], ["no 'answer' column"]),
        "bad base64": ([good, dict(second, image="@" * 80)], ["row 1 (index 1)", "image 0 is not valid base64"]),
        "not an image": ([good, dict(second, image=b64(b"not a png" * 9))], ["row 1 (index 1)", "no readable image"]),
        "bad image list": ([dict(good, image=f"[{b64(RED)}]")], ["row 0 (index 0)", "no Python list"]),
        "reference to a missing index": ([good, dict(second, image="7")], ["row 1 (index 1)", "'7' refers to an index"]),
        "empty answer": ([good, dict(second, answer="")], ["row 1 (index 1)", "empty 'answer'"]),
        "options skip a letter": ([dict(good, B="", C="z")], ["row 0 (index 0)", "A, C skip a letter"]),
        "repeated index": ([good, dict(second, index=0)], ["row 1 (index 0)", "repeats row 0"]),
        "unknown problem type": ([dict(good, problem_type="essay")], ["row 0 (index 0)", "'essay'"]),
        "missing image file": ([{"index": 5, "question": "Q", "answer": "1", "image_path": "gone.png"}],
                               ["row 0 (index 5)", "image file not found", "gone.png"]),
        "unreadable image file": ([{"index": 5, "question": "Q", "answer": "1", "image_path": "junk.png"}],
                                  ["row 0 (index 5)", "junk.png is no readable image"]),
        "placeholders without images": ([good, dict(second, question="<image> or <image>?")],
                                        ["row 1 (index 1)", "holds 2 <image> placeholder(s) but the row has 1 image"]),
    }[case]
    (tmp_path / "junk.png").write_text("not a png")
    return write_tsv(tmp_path / f"{case.replace(' ', '_')}.tsv", rows), expected


MALFORMED = ["no question column", "no answer column", "bad base64", "not an image", "bad image list",
             "reference to a missing index", "empty answer", "options skip a letter", "repeated index",
             "unknown problem type", "missing image file", "unreadable image file", "placeholders without images"]


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_tsv_raises_input_error_naming_file_and_row(case, tmp_path):
    path, expected = malformed(tmp_path, case)
    with pytest.raises(InputError) as err:
        read_vlmeval_tsv(path, "bench")
    message = str(err.value)
    assert message.startswith(path) and "\n" not in message
    for piece in expected:
        assert piece in message


def test_malformed_tsv_exits_2_with_one_line_before_anything_is_written(model_b, tmp_path):
    path, _ = malformed(tmp_path, "reference to a missing index")
    out_dir = tmp_path / "out"
    result = run_script([sys.executable, MAIN, "--model-path", model_b, "--benchmark-tsv", path,
                         "--output-dir", str(out_dir), *COMMON], timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {path}: row 1 (index 1): image cell '7' refers to an index "
                                                  "that holds no image"]
    assert not out_dir.exists()


def test_the_model_sees_hint_options_and_every_image(hf_run):
    prompts = hf_run["prompts"]
    assert len(prompts) == len(PATHS) + len(MMB)
    first = prompts[len(PATHS)]
    assert first.startswith(f"<|im_start|>system\n{EVAL_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    assert first.endswith("<|vision_end|>Hint: Look at the centre.\nQuestion: Which color is the square?\nOptions:\n"
                          "A. red\nB. green\nC. blue\nPlease select the correct answer from the options above."
                          "<|im_end|>\n<|im_start|>assistant\n")
    image_counts = [text.count("<|vision_start|>") for text in prompts]
    assert image_counts == [1, 2, 1, 1, 1, 2, 1, 1, 1]


def test_per_category_scores_are_the_hand_computed_means(hf_run):
    summary = hf_run["summary"]
    mmb = summary["benchmarks"]["MMB_tiny"]
    assert mmb["metric"] == RULE_BASED and mmb["count"] == 7
    assert mmb["score"] == pytest.approx((3 + E) / 7, abs=1e-12)
    assert mmb["by_category"] == {
        "mixed": {"score": 0.5, "count": 2}, "numeric": {"score": 0.0, "count": 1},
        "open": {"score": pytest.approx(E, abs=1e-12), "count": 1},
        "pick_a": {"score": 0.0, "count": 1}, "pick_b": {"score": 1.0, "count": 2}}
    assert mmb["by_l2-category"] == {"perception": {"score": pytest.approx(1 / 3), "count": 3},
                                     "reasoning": {"score": pytest.approx((2 + E) / 4), "count": 4}}
    paths = summary["benchmarks"]["paths_tsv"]
    assert paths == {"metric": RULE_BASED, "score": 0.5, "count": 2}  # no category column, no groups
    assert summary["by_dataset"]["paths_tsv"] == {"score": 0.5, "count": 2}
    assert summary["overall"] == {"score": pytest.approx((4 + E) / 9, abs=1e-12), "count": 9}
    with open(hf_run["out"] / "predictions.jsonl") as f:
        predictions = [json.loads(line) for line in f]
    assert [(p["dataset"], p["id"]) for p in predictions] == [("paths_tsv", "1"), ("paths_tsv", "2")] + [
        ("MMB_tiny", str(r["index"])) for r in MMB]
    with open(hf_run["out"] / "scores.csv") as f:
        lines = list(csv.DictReader(f))
    by_key = {(line["benchmark"], line["group"], line["name"]): line for line in lines}
    assert float(by_key["MMB_tiny", "category", "mixed"]["score"]) == 0.5
    assert by_key["MMB_tiny", "l2-category", "reasoning"]["count"] == "4"
    assert float(by_key["paths_tsv", "overall", "paths_tsv"]["score"]) == 0.5
    assert len(lines) == 2 + 5 + 2  # two overall lines, five categories, two l2-categories


def test_predictions_tsv_keeps_the_input_columns_and_adds_prediction_and_score(hf_run, files):
    written = pd.read_csv(hf_run["out"] / "MMB_tiny_predictions.tsv", sep="\t", dtype=str, keep_default_na=False)
    source = pd.read_csv(files["mmb"], sep="\t", dtype=str, keep_default_na=False).drop(columns="image")
    assert list(written.columns) == list(source.columns) + ["prediction", "score"]
    pd.testing.assert_frame_equal(written[list(source.columns)], source)
    assert set(written["prediction"]) == {"<think>x</think><answer>B</answer>"}
    assert [float(s) for s in written["score"]] == pytest.approx([MMB_SCORES[r["index"]] for r in MMB], abs=1e-12)
    with open(hf_run["out"] / "paths_tsv_predictions.tsv", newline="") as f:
        records = list(csv.DictReader(f, delimiter="\t"))
    assert [(r["index"], r["image_path"], float(r["score"])) for r in records] == [
        ("1", "a.png", 0.0), ("2", "['a.png', 'b.png']", 1.0)]


@pytest.fixture(scope="module")
def model_yes(tiny_assets, tmp_path_factory):
    return scripted_model(tiny_assets["model"], str(tmp_path_factory.mktemp("yes")),
                          reply="<think>x</think><answer>Yes</answer>")


def test_mme_and_chartqa_get_their_official_metrics(model_yes, tmp_path):
    # MME as VLMEvalKit ships it: the second question of an image refers to the first's index; image_path is a name
    mme = [
        dict(index=0, image=b64(RED), question="Red?", answer="Yes", category="existence", image_path="e/1.jpg"),
        dict(index=1, image="0", question="Blue?", answer="No", category="existence", image_path="e/1.jpg"),
        dict(index=2, image=b64(GREEN), question="Green?", answer="Yes", category="existence", image_path="e/2.jpg"),
        dict(index=3, image="2", question="Square?", answer="Yes", category="existence", image_path="e/2.jpg"),
        dict(index=4, image=b64(BLUE), question="Runs?", answer="No", category="code_reasoning", image_path="c/3.jpg"),
        dict(index=5, image="4", question="Halts?", answer="No", category="code_reasoning", image_path="c/3.jpg"),
        dict(index=6, image=b64(RED), question="Prints?", answer="Yes", category="code_reasoning", image_path="c/4.jpg"),
        dict(index=7, image="6", question="Loops?", answer="No", category="code_reasoning", image_path="c/4.jpg"),
    ]
    # relaxed accuracy matches "Yes" exactly (case-insensitive); the rule-based ROUGE credits "yes." too
    chart = [dict(index=i, image=b64(GREEN), question="Q?", answer=a) for i, a in enumerate(["Yes", "yes.", "No", "12"])]
    mme_path, chart_path = write_tsv(tmp_path / "mme_small.tsv", mme), write_tsv(tmp_path / "ChartQA_TEST.tsv", chart)
    summary = run_eval(tmp_path / "out", "--model-path", model_yes, "--benchmark-tsv", f"{mme_path},{chart_path}",
                       "--benchmark-name", "MME", "--benchmark-name", "ChartQA_TEST")
    got = summary["benchmarks"]["MME"]
    # existence: right on 0, 2, 3 -> acc 75, acc+ 50 (image 2 only); code_reasoning: right on 6 -> acc 25, acc+ 0
    assert got["metric"] == MME_SCORE
    assert (got["perception"], got["cognition"], got["score"]) == (125.0, 25.0, 150.0)
    assert got["subtasks"] == {"code_reasoning": 25.0, "existence": 125.0}
    assert got["by_category"] == {"code_reasoning": {"score": 0.25, "count": 4}, "existence": {"score": 0.75, "count": 4}}
    assert len(got["missing_subtasks"]) == 12
    chartqa = summary["benchmarks"]["ChartQA_TEST"]
    assert (chartqa["metric"], chartqa["score"], chartqa["count"]) == (RELAXED_ACCURACY, 0.25, 4)
    # outcome reward (free-form): "Yes" and "yes." both score ROUGE-1 = ROUGE-L = 1, ROUGE-2 = 0 (no bigram): 2/3
    assert summary["by_dataset"]["ChartQA_TEST"]["score"] == pytest.approx(2 * (2 / 3) / 4, abs=1e-12)
    written = pd.read_csv(tmp_path / "out" / "MME_predictions.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(written["score"]) == ["1.0", "0.0", "1.0", "1.0", "0.0", "0.0", "1.0", "0.0"]


def test_relaxed_correctness_allows_five_percent_on_numbers_only():
    cases = [("10", "10.4", True), ("10", "9.6", True), ("10", "11", False), ("12%", "0.12", True),
             ("0", "0", True), ("0.0", "0", False), ("Yes", "yes", True), ("ten", "10", False), ("1,000", "1000", False)]
    assert [relaxed_correctness(prediction, target) for prediction, target, _ in cases] == [c[2] for c in cases]


def test_yes_no_and_row_scores_follow_vlmevalkit_rules():
    assert [yes_no(t) for t in ["Yes, it is.", "no", "Yes and no", "Yesterday", ""]] == [
        "Yes", "No", "Unknown", "Unknown", "Unknown"]
    reply = "<think>x</think><answer> 10 </answer>"
    predictions = [{"prediction": reply, "answer": a, "score": 0.5} for a in ["10.3", "['ten', '9.8']", "11", "[oops"]]
    predictions.append({"prediction": "<answer>10</answer>", "answer": "10", "score": 0.0})  # no think: format fails
    assert row_scores(RELAXED_ACCURACY, predictions, 4096) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert row_scores(RELAXED_ACCURACY, predictions[:1], 1) == [0.0]  # " 10 " is longer than the cap
    assert row_scores(RULE_BASED, predictions, 4096) == [0.5] * 4 + [0.0]


def test_row_scores_read_the_first_answer_and_allow_text_after_it_unless_strict_format():
    predictions = [{"prediction": p, "answer": "10"} for p in [
        "<think>x</think><answer>10</answer>.", "<think>x</think><answer>10</answer><answer>3</answer>",
        "<think>x</think><answer>3</answer>\n<answer>10</answer>"]]
    assert row_scores(RELAXED_ACCURACY, predictions, 4096) == [1.0, 1.0, 0.0]
    assert row_scores(RELAXED_ACCURACY, predictions, 4096, strict_format=True) == [0.0, 0.0, 1.0]


def test_mme_score_sums_acc_and_acc_plus_per_subtask():
    rows = [{"source": {"category": c}, "image_key": k} for c, k in
            [("OCR", "a"), ("OCR", "a"), ("OCR", "b"), ("OCR", "b"), ("text_translation", "c"), ("text_translation", "c")]]
    result = mme_score(rows, [1.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    assert result["subtasks"] == {"OCR": 75.0 + 50.0, "text_translation": 200.0}
    assert (result["perception"], result["cognition"], result["score"]) == (125.0, 200.0, 325.0)
    assert set(result["missing_subtasks"]) == set(MME_PERCEPTION + MME_COGNITION) - {"OCR", "text_translation"}


def test_benchmark_flags_are_checked(model_b, files, tmp_path):
    cases = [
        (["--benchmark-tsv", files["mmb"], "--benchmark-name", "a,b"], "--benchmark-name gives 2 names for 1"),
        ([], "nothing to evaluate"),
        (["--data-path", "paths_tsv"], "--data-path needs --registry"),
        (["--benchmark-tsv", files["mmb"], "--benchmark-name", "a b"], "'a b'"),
        (["--benchmark-tsv", f"{files['mmb']},{files['mmb']}"], "repeat"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["--model-path", model_b, "--output-dir", str(tmp_path / "out"), *flags])
        assert exit_info.value.code == 2, flags
    for flags, message in cases:
        from step3_eval.main import check_args, parse_args

        with pytest.raises(InputError, match=message.replace("(", r"\(")):
            check_args(parse_args(["--model-path", model_b, "--output-dir", "x", *flags]))
    assert not (tmp_path / "out").exists()


@pytest.mark.vllm
def test_vllm_backend_writes_the_hf_result_files(hf_run, model_b, files, tmp_path):
    pytest.importorskip("vllm")
    out_dir = tmp_path / "out"
    result = run_script([sys.executable, MAIN, *b_run_flags(model_b, files), "--output-dir", str(out_dir),
                         "--backend", "vllm", "--max-model-len", "2048", *COMMON])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LLM engine" in result.stdout + result.stderr  # vLLM's start-up log: the run really went through vLLM
    for name in ("MMB_tiny_predictions.tsv", "paths_tsv_predictions.tsv", "scores.csv", "predictions.jsonl"):
        assert (out_dir / name).read_text() == (hf_run["out"] / name).read_text(), name


@pytest.mark.slow
def test_two_deepspeed_ranks_write_the_single_process_result_files(hf_run, model_b, files, tmp_path):
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    out_dir = tmp_path / "out"
    result = run_script([launcher, "--num_gpus", "2", "--master_port", str(free_port()), MAIN,
                         *b_run_flags(model_b, files), "--output-dir", str(out_dir), "--batch-size", "3", *COMMON])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    for name in ("MMB_tiny_predictions.tsv", "paths_tsv_predictions.tsv", "scores.csv", "predictions.jsonl"):
        assert (out_dir / name).read_text() == (hf_run["out"] / name).read_text(), name
