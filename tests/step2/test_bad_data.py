"""A 2-rank step-2 run over real data's troubles: an over-long prompt (dropped at load time, one log line), a JPEG
cut short inside its pixel data (passes the load-time verify(), replaced when its step comes, data/bad_rows) and a
3-image row. It finishes, and a resume from the step-2 checkpoint meets the bad row again and repeats the run."""
import io
import json
import shutil

import pytest
from PIL import Image

from step2_trust_grpo.main import prompts_for_step
from tests.helpers import check_ok, metrics, run_step2, without_timings

pytestmark = pytest.mark.slow
FLAGS = ("--rollout-engine", "hf", "--variant", "grpo", "--save-every", "2", "--log-completions", "--max-steps", "4")
SEED, BATCH, RANKS = 42, 4, 2  # step 2's default --seed; run_step2's --rollout-batch-size over 2 ranks


def write_bad_data(tiny_assets, folder):
    """Returns (registry, ids of the rows left after the drop). Row 0 of those is the cut JPEG: with 13 rows and
    seed 42, the data order reaches it in step 3, after the checkpoint the resume starts from."""
    with open(tiny_assets["train"]) as f:
        good = json.load(f)[:11]
    (folder / "images").mkdir()
    for row in good:
        if row.get("path"):
            shutil.copy(f"{tiny_assets['images']}/{row['path']}", folder / "images")
    pictures = [row["path"] for row in good if row.get("path")]
    buffer = io.BytesIO()
    Image.open(folder / "images" / pictures[0]).convert("RGB").save(buffer, format="JPEG", quality=95)
    (folder / "images" / "cut.jpg").write_bytes(buffer.getvalue()[: int(0.6 * len(buffer.getvalue()))])
    cut = dict(good[0], problem_id="cut-jpeg", path="cut.jpg", data_type="image")
    three = dict(good[0], problem_id="three-images", path=pictures[1:4], data_type="image")
    long = dict(good[1], problem_id="over-long", problem="Count the words: " + "word " * 700)
    rows = [cut, *good[:7], three, long, *good[7:]]
    (folder / "bad.json").write_text(json.dumps(rows))
    with open(tiny_assets["registry"]) as f:
        columns = json.load(f)["tiny_train"]["columns"]
    (folder / "dataset_info.json").write_text(json.dumps(
        {"bad_data": {"file_path": "bad.json", "image_base_path": "images", "columns": columns}}))
    return str(folder / "dataset_info.json"), [row["problem_id"] for row in rows if row is not long]


def test_over_long_cut_short_and_3_image_rows_train_log_their_counts_and_resume_exactly(tiny_assets, tmp_path):
    registry, kept = write_bad_data(tiny_assets, tmp_path)
    output_dir = tmp_path / "run"
    flags = [*FLAGS, "--registry", registry, "--data-path", "bad_data"]
    # what each rank trains on: the step's rows, the cut JPEG (row 0) replaced by the next row with images (row 1)
    picked = {(step, rank): [kept[i] for i in prompts_for_step(len(kept), step, BATCH, rank, RANKS, SEED)]
              for step in range(1, 5) for rank in range(RANKS)}
    expected_bad_rows = [float(sum(picked[step, rank].count("cut-jpeg") for rank in range(RANKS)))
                         for step in range(1, 5)]
    assert expected_bad_rows[:2] == [0, 0] and sum(expected_bad_rows) > 0  # met only after the resume point
    assert any("three-images" in picked[step, rank] for step in (3, 4) for rank in range(RANKS))

    first = run_step2(tiny_assets, output_dir, *flags)
    check_ok(first)
    uninterrupted = metrics(output_dir)
    logged = [[json.loads(line) for line in open(output_dir / "completions" / f"rank{rank}.jsonl")]
              for rank in range(RANKS)]
    # a resume from step 2's checkpoint, as after a crash right after its save
    (output_dir / "checkpoints" / "latest").write_text("step2")
    second = run_step2(tiny_assets, output_dir, *flags, "--resume")
    check_ok(second)

    assert [row["data/bad_rows"] for row in uninterrupted] == expected_bad_rows
    assert [without_timings(row) for row in metrics(output_dir)] == [without_timings(row) for row in uninterrupted]
    for rank in range(RANKS):
        groups = [json.loads(line) for line in open(output_dir / "completions" / f"rank{rank}.jsonl")]
        assert groups == logged[rank]
        assert [g["problem_id"] for g in groups] == [
            kept[1] if row_id == "cut-jpeg" else row_id for step in range(1, 5) for row_id in picked[step, rank]]
        assert all(len(g["completions"]) == 4 for g in groups)
    for run in (first, second):
        dropped = ("--data-path bad_data: dropped 1 of 14 prompts longer than --max-prompt-length 512 tokens "
                   "(bad_data 1); the longest, row id over-long of bad_data, has ")
        assert run.stderr.count(dropped) == 1  # rank 0 reports it
        warning = (f"dataset bad_data, row id cut-jpeg: cannot read image {tmp_path}/images/cut.jpg (image file is "
                   f"truncated")
        assert run.stderr.count(warning) == 1
        assert f"replaced by row id {kept[1]} (the next readable one; --fatal-bad-rows stops instead)" in run.stderr
