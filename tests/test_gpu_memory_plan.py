"""benchmarks/gpu_memory_plan.py, the script a lent GPU runs to check the memory plan: its micro-batch is the one the
plan sizes (every image at --max-pixels, each completion its full length), and its --quick run goes through step 2's
engines and passes on CPU and writes the plan's figures (no peaks without a GPU)."""
import json

import pytest

from sophiavl.utils.model import load_processor


def test_the_micro_batch_has_the_planned_image_tokens_and_full_completions(real_shaped_judge):
    from benchmarks.gpu_memory_plan import micro_batch

    processor = load_processor(real_shaped_judge, 3136, 6272)
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # 6,272 pixels = 8 merged tokens of 28 x 28: not a square (a square within them would have 4)
    batch = micro_batch(processor, micro=3, completion=5, pixels=6272, words=30)
    assert (batch["input_ids"] == pad).sum(dim=1).tolist() == [8, 8, 8]
    assert batch["completion_mask"].sum(dim=1).tolist() == [5, 5, 5]
    assert batch["attention_mask"].all()  # one prompt three times: no padding
    assert batch["image_grid_thw"].tolist() == [[1, 4, 8]] * 3 and batch["image_index"].tolist() == [0, 0, 0]
    assert batch["pixel_values"].shape[0] == 32  # the shared image's patches once


@pytest.mark.slow
def test_quick_run_goes_through_step2s_engines_and_reports_the_plan(real_shaped_judge, tmp_path, capsys):
    from benchmarks import gpu_memory_plan

    out = tmp_path / "work"
    assert gpu_memory_plan.main(["--tokenizer-from", real_shaped_judge, "--config", real_shaped_judge, "--out",
                                 str(out), "--quick", "--cases", "1:2:6", "--pixels", "6272",
                                 "--prompt-words", "30"]) == 0
    result, = json.loads((out / "gpu_memory_plan.json").read_text())["results"]
    assert result["checkpointing"] and result["micro_batch_size"] == 2 and result["completion_tokens"] == 6
    assert result["measured"] is None and result["resident_after_step"] is None  # no GPU here
    assert result["attn_implementation"] == "sdpa"
    assert 0 < result["planned_resident"] < result["planned"]["update"]
    assert result["loss"] == result["loss"]  # a number, not NaN
    table = capsys.readouterr().out
    assert "| True | 2 | " in table and "| update | " in table
