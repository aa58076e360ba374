"""Step 3 end to end on scripted models (real weights whose greedy reply is fixed): files, scores, backends,
rank sharding, prompt templates and bad input. Expected scores are computed by hand from the rows."""
import contextlib
import importlib.util
import io
import json
import math
import os
import re
import sys

import pytest
import torch

import sophiavl.utils.generation
from step3_eval.main import main
from tests.scripted_model import scripted_model
from sophiavl.utils.data import load_rows
from sophiavl.utils.prompts import EVAL_SYSTEM_PROMPT, QUESTION_TEMPLATE, TYPE_TEMPLATE
from sophiavl.utils.outcome_reward import outcome_reward
from tests.helpers import free_port, run_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAIN = os.path.join(REPO, "step3_eval", "main.py")
REPLY = "<think>x</think><answer>B</answer>"
DATA = "tiny_test,test_head"  # test_head: the first HEAD_ROWS rows of tiny_test again, as a second dataset
HEAD_ROWS = 10
COMMON = ["--max-new-tokens", "12"]
IMAGE = "<|vision_start|>" + "<|image_pad|>" * 16 + "<|vision_end|>"  # 112x112 px: 8x8 patches, 2x2 merged


def truth_of(row):
    return row["answer"].removeprefix("<answer>").removesuffix("</answer>")


def hand_score(word, row):
    """Score of the reply <think>x</think><answer>{word}</answer> on `row`, worked out by hand for a one-word
    answer against the tiny tasks' truths (a letter, a number, one OCR word, a short phrase)."""
    truth, kind = truth_of(row), row["problem_type"]
    if kind == "multiple choice":
        return 1.0 if word == truth else 0.0  # a letter answer names that one option; a word names none
    if kind == "numerical":
        assert truth.isdigit() and not word.isdigit()
        return 0.0
    if kind == "OCR":
        assert len(truth.split()) == 1
        return 1.0 if word == truth else math.exp(-1)  # one substituted word: WER 1
    # free-form / text: ROUGE on n truth words. A shared word gives ROUGE-1 = ROUGE-L F = 2 * (1 * 1/n) / (1 + 1/n)
    # = 2 / (n + 1) and ROUGE-2 = 0 (the reply has no bigram): mean 4 / (3 (n + 1)). No shared word: 0.
    words = truth.lower().split()
    assert len(words) >= 2 or word.lower() not in words
    return 4 / (3 * (len(words) + 1)) if word.lower() in words else 0.0


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def run_eval(model, registry, out_dir, *extra):
    """main() in this process; returns (predictions, summary, printed stdout)."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        main(["--model-path", model, "--registry", registry, "--output-dir", str(out_dir), *COMMON, *extra])
    with open(os.path.join(out_dir, "predictions.jsonl")) as f:
        predictions = [json.loads(line) for line in f]
    with open(os.path.join(out_dir, "summary.json")) as f:
        return predictions, json.load(f), stdout.getvalue()


def read_predictions(out_dir):
    with open(os.path.join(out_dir, "predictions.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def model_b(tiny_assets, tmp_path_factory):
    return scripted_model(tiny_assets["model"], str(tmp_path_factory.mktemp("scripted_b")), reply=REPLY)


@pytest.fixture(scope="module")
def registry(tiny_assets, tmp_path_factory):
    """tiny_test plus test_head (its first rows in a second file), so per-dataset means differ."""
    folder = tmp_path_factory.mktemp("registry")
    with open(tiny_assets["test"]) as f:
        head = json.load(f)[:HEAD_ROWS]
    with open(folder / "test_head.json", "w") as f:
        json.dump(head, f)
    with open(tiny_assets["registry"]) as f:
        columns = json.load(f)["tiny_test"]["columns"]
    entries = {"tiny_test": tiny_assets["test"], "test_head": str(folder / "test_head.json")}
    info = {name: {"file_path": path, "image_base_path": tiny_assets["images"], "columns": columns}
            for name, path in entries.items()}
    with open(folder / "dataset_info.json", "w") as f:
        json.dump(info, f)
    return str(folder / "dataset_info.json")


@pytest.fixture(scope="module")
def rows(registry):
    return load_rows(DATA, registry)


@pytest.fixture(scope="module")
def hf_run(model_b, registry, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("hf_run") / "out"
    predictions, summary, printed = run_eval(model_b, registry, out_dir, "--data-path", DATA, "--backend", "hf")
    return {"out": str(out_dir), "predictions": predictions, "summary": summary, "printed": printed}


def test_scripted_model_replies_the_same_under_transformers(model_b, rows):
    from sophiavl.utils.data import open_images
    from sophiavl.utils.model import load_model, load_processor
    from sophiavl.utils.prompts import policy_messages

    processor, model = load_processor(model_b), load_model(model_b, dtype=torch.float32)
    picked = [rows[0], rows[4]]  # an image row and a text-only row
    images = [open_images(row) for row in picked]
    chats = [policy_messages(row["prompt"], row["problem_type"], row["options"], num_images=len(imgs))
             for row, imgs in zip(picked, images)]
    texts, token_ids = sophiavl.utils.generation.hf_generate(model, processor, chats, images,
                                                           sophiavl.utils.generation.Sampling(max_new_tokens=12))
    assert [len(imgs) for imgs in images] == [1, 0]
    assert texts == [REPLY, REPLY]
    end_of_turn = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert token_ids[0] == processor.tokenizer.encode(REPLY, add_special_tokens=False) + [end_of_turn]


def test_scripted_model_rejects_replies_that_are_not_distinct_single_tokens(tiny_assets, tmp_path):
    with pytest.raises(AssertionError, match="distinct"):
        scripted_model(tiny_assets["model"], str(tmp_path / "m"), reply="<answer>B</answer><answer>")


def test_predictions_are_one_row_per_input_in_input_order(hf_run, rows):
    predictions = hf_run["predictions"]
    assert len(rows) == 40 + HEAD_ROWS and len(predictions) == len(rows)
    for index, (prediction, row) in enumerate(zip(predictions, rows)):
        assert prediction["index"] == index
        assert (prediction["dataset"], prediction["id"]) == (row["dataset"], row["id"])
        assert (prediction["problem_type"], prediction["answer"]) == (row["problem_type"], row["answer"])
        assert prediction["prediction"] == REPLY and prediction["extracted"] == "B"
        assert prediction["score"] == outcome_reward(REPLY, row["answer"], row["problem_type"])
        assert prediction["score"] == pytest.approx(hand_score("B", row), abs=1e-12)
    assert [p["dataset"] for p in predictions] == ["tiny_test"] * 40 + ["test_head"] * HEAD_ROWS
    mc_scores = {p["score"] for p in predictions if p["problem_type"] == "multiple choice"}
    assert mc_scores == {0.0, 1.0}  # some MC answers are B, some are not: the scores depend on the row


def test_summary_holds_the_hand_computed_means(hf_run, rows):
    summary = hf_run["summary"]
    hand = [hand_score("B", row) for row in rows]
    assert summary["overall"] == {"score": pytest.approx(mean(hand), abs=1e-12), "count": 50}
    for key, section in (("problem_type", "by_problem_type"), ("dataset", "by_dataset")):
        groups = sorted({row[key] for row in rows})
        assert list(summary[section]) == groups
        for group in groups:
            scores = [score for score, row in zip(hand, rows) if row[key] == group]
            assert summary[section][group] == {"score": pytest.approx(mean(scores), abs=1e-12), "count": len(scores)}
    by_type = summary["by_problem_type"]
    mc_rows = [row for row in rows if row["problem_type"] == "multiple choice"]
    assert by_type["multiple choice"]["score"] == pytest.approx(mean(truth_of(r) == "B" for r in mc_rows))
    assert by_type["OCR"]["score"] == pytest.approx(math.exp(-1))
    assert by_type["numerical"]["score"] == by_type["free-form"]["score"] == by_type["text"]["score"] == 0.0
    assert summary["by_dataset"]["tiny_test"]["score"] != summary["by_dataset"]["test_head"]["score"]
    assert summary["format_ok"] == 1.0
    assert (summary["backend"], summary["prompt_template"], summary["data_path"]) == ("hf", "eval", DATA)


def test_run_records_args_commit_and_versions(hf_run, model_b):
    with open(os.path.join(hf_run["out"], "args.json")) as f:
        args = json.load(f)
    with open(os.path.join(hf_run["out"], "run_info.json")) as f:
        info = json.load(f)
    assert (args["model_path"], args["data_path"], args["backend"], args["max_new_tokens"]) == (model_b, DATA, "hf", 12)
    assert "commit" in info["git"] and info["versions"]["torch"]
    if os.path.exists(os.path.join(REPO, ".git")):
        assert re.fullmatch(r"[0-9a-f]{40}", info["git"]["commit"])
    assert sorted(os.listdir(hf_run["out"])) == ["args.json", "predictions.jsonl", "run_info.json", "summary.json"]


def test_printed_table_ends_with_the_overall_score(hf_run):
    lines = hf_run["printed"].strip().splitlines()
    overall = hf_run["summary"]["overall"]["score"]
    assert lines[-1].split() == ["overall", f"{100 * overall:.1f}", "50"]
    assert any(line.split()[:1] == ["test_head"] for line in lines)


def test_word_reply_scores_rouge_and_exp_minus_wer_by_hand(tiny_assets, tmp_path):
    model = scripted_model(tiny_assets["model"], str(tmp_path / "blue"), reply="<think>x</think><answer>blue</answer>")
    predictions, summary, _ = run_eval(model, tiny_assets["registry"], tmp_path / "out", "--data-path", "tiny_test")
    rows = load_rows("tiny_test", tiny_assets["registry"])
    assert [p["extracted"] for p in predictions] == ["blue"] * len(rows)
    for prediction, row in zip(predictions, rows):
        assert prediction["score"] == pytest.approx(hand_score("blue", row), abs=1e-12)
    free_form = [row for row in rows if row["problem_type"] == "free-form"]
    with_blue = sum("blue" in truth_of(row).split() for row in free_form)
    assert 0 < with_blue < len(free_form) and all(len(truth_of(row).split()) == 2 for row in free_form)
    assert summary["by_problem_type"]["free-form"]["score"] == pytest.approx(with_blue * 4 / 9 / len(free_form))
    assert summary["by_problem_type"]["multiple choice"]["score"] == 0.0  # "blue" is no option letter


def test_reply_without_think_tags_scores_zero_and_fails_the_format(tiny_assets, tmp_path):
    model = scripted_model(tiny_assets["model"], str(tmp_path / "bare"), reply="<answer>B</answer>")
    predictions, summary, _ = run_eval(model, tiny_assets["registry"], tmp_path / "out",
                                       "--data-path", "tiny_test", "--max-samples", "5")
    assert truth_of(load_rows("tiny_test", tiny_assets["registry"])[0]) == "B"  # would score 1 with <think>
    outcomes = [(p["prediction"], p["extracted"], p["score"]) for p in predictions]
    assert outcomes == [("<answer>B</answer>", "B", 0.0)] * 5
    assert summary["overall"]["score"] == 0.0 and summary["format_ok"] == 0.0


def test_text_after_the_answer_passes_the_reference_gate_and_fails_strict_format(tiny_assets, tmp_path):
    model = scripted_model(tiny_assets["model"], str(tmp_path / "dot"), reply="<think>x</think><answer>B</answer>.")
    assert truth_of(load_rows("tiny_test", tiny_assets["registry"])[0]) == "B"
    for strict, expected in ((False, 1.0), (True, 0.0)):
        predictions, summary, _ = run_eval(model, tiny_assets["registry"], tmp_path / f"out_{strict}", "--data-path",
                                           "tiny_test", "--max-samples", "1", *(["--strict-format"] if strict else []))
        assert [(p["extracted"], p["score"]) for p in predictions] == [("B", expected)]
        assert summary["format_ok"] == expected and summary["strict_format"] is strict


def test_prompt_template_changes_what_reaches_the_model(model_b, tiny_assets, tmp_path, monkeypatch):
    seen = []
    real_chat_inputs = sophiavl.utils.generation.chat_inputs

    def recording_chat_inputs(processor, *args, **kwargs):
        inputs = real_chat_inputs(processor, *args, **kwargs)
        seen.extend(processor.tokenizer.batch_decode(inputs["input_ids"]))
        return inputs

    monkeypatch.setattr(sophiavl.utils.generation, "chat_inputs", recording_chat_inputs)
    for template in ("eval", "train"):
        predictions, summary, _ = run_eval(model_b, tiny_assets["registry"], tmp_path / template, "--data-path",
                                           "tiny_test", "--max-samples", "1", "--prompt-template", template)
        assert [p["prediction"] for p in predictions] == [REPLY] and summary["prompt_template"] == template
    row = load_rows("tiny_test", tiny_assets["registry"])[0]
    problem, options = row["prompt"], row["options"]
    assert row["problem_type"] == "multiple choice" and options[0] == "A. red"
    user_eval = (f"Question: {problem}\nOptions:\n" + "\n".join(options)
                 + "\nPlease select the correct answer from the options above.")
    user_train = QUESTION_TEMPLATE.replace("{Question}", problem + "; ".join(options)) + TYPE_TEMPLATE["multiple choice"]
    chat = "<|im_start|>system\n{}<|im_end|>\n<|im_start|>user\n" + IMAGE + "{}<|im_end|>\n<|im_start|>assistant\n"
    assert seen == [chat.format(EVAL_SYSTEM_PROMPT, user_eval), chat.format("You are a helpful assistant.", user_train)]


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_vllm_backend_gives_the_hf_predictions(hf_run, model_b, registry, tmp_path):
    out_dir = tmp_path / "out"
    result = run_script([sys.executable, MAIN, "--model-path", model_b, "--data-path", DATA, "--registry", registry,
                         "--output-dir", str(out_dir), "--backend", "vllm", "--max-model-len", "2048", *COMMON])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LLM engine" in result.stdout + result.stderr  # vLLM's start-up log: the run really went through vLLM
    assert read_predictions(out_dir) == hf_run["predictions"]


@pytest.mark.slow
def test_two_deepspeed_ranks_give_the_single_process_predictions_in_input_order(hf_run, model_b, registry, tmp_path):
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    out_dir = tmp_path / "out"
    # batch size 7: the ranks' 25 rows each split into batches unlike the single run's
    result = run_script([launcher, "--num_gpus", "2", "--master_port", str(free_port()), MAIN, "--model-path", model_b,
                         "--data-path", DATA, "--registry", registry, "--output-dir", str(out_dir),
                         "--batch-size", "7", *COMMON])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert read_predictions(out_dir) == hf_run["predictions"]
    with open(out_dir / "summary.json") as f:
        assert json.load(f) == hf_run["summary"]


BAD_INPUTS = {
    "unknown dataset": (["--data-path", "tiny_test,no_such_set"], ["no_such_set", "{registry}"]),
    "missing registry": (["--registry", "{tmp}/missing.json"], ["{tmp}/missing.json"]),
    "zero batch size": (["--batch-size", "0"], ["--batch-size"]),
    "output dir beneath a file": (["--output-dir", "{tmp}/a_file/out"], ["--output-dir", "{tmp}/a_file"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, model_b, tiny_assets, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    flags, expected = BAD_INPUTS[case]
    values = {"tmp": str(tmp_path), "registry": tiny_assets["registry"]}
    out_dir = str(tmp_path / "out")
    defaults = {"--data-path": "tiny_test", "--registry": tiny_assets["registry"], "--output-dir": out_dir}
    chosen = dict(defaults, **{flag: value.format(**values) for flag, value in zip(flags[::2], flags[1::2])})
    command = [sys.executable, MAIN, "--model-path", model_b, *COMMON]
    for flag, value in chosen.items():
        command += [flag, value]
    result = run_script(command, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text.format(**values) in lines[0]
    assert not os.path.exists(out_dir) and not os.path.exists(tmp_path / "a_file" / "out")
    assert (tmp_path / "a_file").read_text() == "not a folder"
