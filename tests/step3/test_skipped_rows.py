"""Step 3 on rows it cannot evaluate: an over-long prompt and a JPEG cut short inside its pixel data are scored 0,
marked skipped in predictions.jsonl and listed in summary.json, between rows that are evaluated as usual."""
import contextlib
import io
import json
import logging
import shutil
from types import SimpleNamespace

import pytest
from PIL import Image

from step3_eval.main import eval_chat, main
from step3_eval.skipped import default_max_prompt_length
from tests.scripted_model import scripted_model
from sophiavl.utils.cli import InputError
from sophiavl.utils.data import load_rows
from sophiavl.utils.model import load_processor
from sophiavl.utils.prompt_length import prompt_lengths
from sophiavl.utils.outcome_reward import outcome_reward

REPLY = "<think>x</think><answer>B</answer>"
LIMIT = 300


@pytest.fixture(scope="module")
def model(tiny_assets, tmp_path_factory):
    return scripted_model(tiny_assets["model"], str(tmp_path_factory.mktemp("scripted")), reply=REPLY)


@pytest.fixture(scope="module")
def registry(tiny_assets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    with open(tiny_assets["test"]) as f:
        good = json.load(f)[:4]
    image_row = next(row for row in good if row.get("path"))
    for row in good:
        if row.get("path"):
            shutil.copy(f"{tiny_assets['images']}/{row['path']}", folder / row["path"])
    buffer = io.BytesIO()
    Image.open(folder / image_row["path"]).convert("RGB").save(buffer, format="JPEG", quality=95)
    (folder / "cut.jpg").write_bytes(buffer.getvalue()[: int(0.6 * len(buffer.getvalue()))])
    rows = good[:2] + [dict(good[0], problem_id="long", problem="Count the words. " + "word " * 400),
                       dict(image_row, problem_id="cut", path="cut.jpg")] + good[2:]
    (folder / "mixed.json").write_text(json.dumps(rows))
    with open(tiny_assets["registry"]) as f:
        columns = json.load(f)["tiny_test"]["columns"]
    (folder / "dataset_info.json").write_text(json.dumps({"mixed": {"file_path": "mixed.json", "columns": columns}}))
    return str(folder / "dataset_info.json")


def test_over_long_and_unreadable_rows_are_scored_0_and_listed(model, registry, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING), contextlib.redirect_stdout(io.StringIO()) as printed:
        main(["--model-path", model, "--registry", registry, "--data-path", "mixed", "--output-dir", str(out),
              "--max-new-tokens", "12", "--max-prompt-length", str(LIMIT)])
    rows = load_rows("mixed", registry)
    with open(out / "predictions.jsonl") as f:
        predictions = [json.loads(line) for line in f]
    with open(out / "summary.json") as f:
        summary = json.load(f)

    args = SimpleNamespace(prompt_template="eval")
    long_length = prompt_lengths(load_processor(model), [rows[2]], lambda r: eval_chat(r, len(r["images"]), args))[0]
    assert long_length > LIMIT
    assert [(p["index"], p["id"]) for p in predictions] == [(k, row["id"]) for k, row in enumerate(rows)]
    for p, row in zip(predictions, rows):
        if row["id"] in ("long", "cut"):
            assert (p["prediction"], p["extracted"], p["score"]) == ("", None, 0.0)
        else:
            assert "skipped" not in p and p["prediction"] == REPLY
            assert p["score"] == outcome_reward(REPLY, row["answer"], row["problem_type"])
    assert predictions[2]["skipped"] == f"prompt of {long_length} tokens > --max-prompt-length {LIMIT}"
    assert predictions[3]["skipped"].startswith("unreadable image: dataset mixed, row id cut: cannot read image ")
    assert "image file is truncated" in predictions[3]["skipped"]

    assert summary["skipped"] == {"count": 2, "note": "scored 0 and counted in every mean", "rows": [
        {"id": "long", "dataset": "mixed", "reason": predictions[2]["skipped"]},
        {"id": "cut", "dataset": "mixed", "reason": predictions[3]["skipped"]}]}
    assert summary["overall"] == {"score": pytest.approx(sum(p["score"] for p in predictions) / 6), "count": 6}
    assert "2 rows skipped (over-long or unreadable), scored 0: see summary.json" in printed.getvalue()
    messages = [record.getMessage() for record in caplog.records]
    assert (f"1 of 6 prompts are longer than --max-prompt-length {LIMIT} tokens and are skipped (scored 0, listed in "
            f"summary.json); the longest, row id long of mixed, has {long_length} tokens") in messages
    assert any(m.startswith("dataset mixed, row id cut: cannot read image ") for m in messages)


def test_the_default_limit_is_the_context_left_after_max_new_tokens(tiny_assets):
    args = SimpleNamespace(model_path=tiny_assets["model"], backend="hf", max_model_len=2048, max_new_tokens=12)
    assert default_max_prompt_length(args) == 8192 - 12  # the tiny model's text_config.max_position_embeddings
    assert default_max_prompt_length(SimpleNamespace(**dict(vars(args), backend="vllm"))) == 2048 - 12
    with pytest.raises(InputError, match=r"--max-new-tokens 2048 leaves no room for a prompt in --max-model-len 2048"):
        default_max_prompt_length(SimpleNamespace(**dict(vars(args), backend="vllm", max_new_tokens=2048)))
