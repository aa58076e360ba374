"""Malformed input at the step-2 command line: one `error:` line naming the file and row (or the flag), exit 2,
within seconds (no model is loaded, DeepSpeed is not even imported) and nothing left in --output-dir."""
import io
import json
import os
import subprocess
import sys
import time

import pytest
from PIL import Image

from sophiavl.utils.data import load_rows

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLUMNS = {"problem": "prompt", "solution": "answer", "path": "images"}
pytestmark = pytest.mark.timeout(120)


def png(size=(32, 32), seed=0):
    """A PNG of noise, so it does not compress to a few bytes and a cut lands inside the pixel data."""
    image = Image.frombytes("RGB", size, bytes((seed * 7 + i * 31) % 251 for i in range(size[0] * size[1] * 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def good_rows():
    """Three valid rows in SophiaVL-R1-130k's format; the cases below break row 1 (problem_id 2)."""
    return [{"problem_id": k + 1, "problem": f"What is shown in picture {k}?", "data_type": "image",
             "problem_type": "free-form", "options": [], "solution": "<answer>a square</answer>",
             "path": f"img{k}.png", "data_source": "synthetic"} for k in range(3)]


def write_dataset(folder, rows=None, file_name="train.json", text=None, raw=None):
    """A registry `dataset_info.json` with one dataset `d`; returns (registry, data file)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for k in range(3):
        (folder / "images" / f"img{k}.png").write_bytes(png(seed=k))
    data_file = folder / file_name
    if raw is not None:
        data_file.write_bytes(raw)
    elif text is not None:
        data_file.write_text(text)
    elif file_name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), data_file)
    elif file_name.endswith(".jsonl"):
        data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif rows is not None:
        data_file.write_text(json.dumps(rows, indent=1))
    registry = folder / "dataset_info.json"
    registry.write_text(json.dumps({"d": {"file_path": file_name, "image_base_path": "images", "columns": COLUMNS}}))
    return str(registry), str(data_file)


def with_row1(**changes):
    rows = good_rows()
    rows[1].update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del rows[1][key]
    return rows


ROW1 = ": row 1 (0-based index, problem_id 2): "


# Each case: folder -> (registry, --data-path, extra flags, output dir or None, the expected message).
def registry_not_json(folder):
    registry, _ = write_dataset(folder, good_rows())
    open(registry, "w").write('{"d": {"file_path": "train.json",}')
    return registry, "d", [], None, f"{registry}: not valid JSON"


def unknown_dataset(folder):
    registry, _ = write_dataset(folder, good_rows())
    return registry, "d,nope", [], None, f"{registry}: unknown dataset 'nope' (known: d)"


def missing_data_file(folder):
    registry, data_file = write_dataset(folder, good_rows())
    os.remove(data_file)
    return registry, "d", [], None, f"{data_file}: data file not found"


def bad_json(folder):
    text = json.dumps(good_rows(), indent=1).replace('"problem_id": 2,', '"problem_id": 2,,')
    registry, data_file = write_dataset(folder, text=text)
    line = text[:text.index(",,")].count("\n") + 1
    return registry, "d", [], None, f"{data_file}: line {line} is not valid JSON"


def bad_jsonl_line(folder):
    lines = [json.dumps(row) for row in good_rows()]
    lines[1] = lines[1][:-1]  # the closing brace of row 1 is lost
    registry, data_file = write_dataset(folder, file_name="train.jsonl", text="\n".join(lines) + "\n")
    return registry, "d", [], None, f"{data_file}: line 2 is not valid JSON"


def missing_column(folder):
    rows = [{k: v for k, v in row.items() if k != "solution"} for row in good_rows()]
    registry, data_file = write_dataset(folder, rows)
    return registry, "d", [], None, f"{data_file}: row 0: no 'answer' column"


def empty_dataset(folder):
    registry, data_file = write_dataset(folder, file_name="train.jsonl", text="\n")
    return registry, "d", [], None, f"{data_file}: dataset 'd' has no rows"


def missing_image(folder):
    registry, data_file = write_dataset(folder, with_row1(path="gone.png"))
    return registry, "d", [], None, f"{data_file}{ROW1}image file not found: {folder / 'images' / 'gone.png'}"


def corrupt_image(folder):
    registry, data_file = write_dataset(folder, good_rows())
    (folder / "images" / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n but the rest is not an image")
    return registry, "d", [], None, f"{data_file}{ROW1}cannot read image {folder / 'images' / 'img1.png'}"


def truncated_image(folder):
    registry, data_file = write_dataset(folder, good_rows())
    image = folder / "images" / "img1.png"
    image.write_bytes(image.read_bytes()[:len(image.read_bytes()) // 2])  # a download cut off half way
    return registry, "d", [], None, f"{data_file}{ROW1}cannot read image {image}"


def unknown_problem_type(folder):
    registry, data_file = write_dataset(folder, with_row1(problem_type="essay"))
    return registry, "d", [], None, f"{data_file}{ROW1}unknown problem_type 'essay'"


def multiple_choice_without_options(folder):
    rows = with_row1(problem_type="multiple choice", solution="<answer>B</answer>")
    registry, data_file = write_dataset(folder, rows)
    return registry, "d", [], None, f"{data_file}{ROW1}multiple choice row without options"


def missing_solution(folder):
    registry, data_file = write_dataset(folder, with_row1(solution=""))
    return registry, "d", [], None, f"{data_file}{ROW1}missing or empty answer (column 'solution')"


def non_utf8_text(folder):
    lines = [json.dumps(row) for row in good_rows()]
    raw = "\n".join(lines).encode().replace(b"picture 1", b"picture \xe9\xff1")  # Latin-1 bytes in row 1
    registry, data_file = write_dataset(folder, file_name="train.jsonl", raw=raw + b"\n")
    return registry, "d", [], None, f"{data_file}: line 2 is not UTF-8 text"


def wrong_parquet_schema(folder):
    rows = [dict(row, path=k * 100) for k, row in enumerate(good_rows())]  # image column of integers
    registry, data_file = write_dataset(folder, rows, file_name="train.parquet")
    return registry, "d", [], None, f"{data_file}: row 0 (0-based index, problem_id 1): an image must be a path"


def horizon_not_positive(folder):
    registry, _ = write_dataset(folder, good_rows())
    return registry, "d", ["--anneal-horizon", "0"], None, "--anneal-horizon must be > 0, got 0.0"


def output_beneath_a_file(folder):
    registry, _ = write_dataset(folder, good_rows())
    (folder / "a_file").write_text("not a directory")
    output_dir = folder / "a_file" / "run"
    return registry, "d", [], output_dir, f"--output-dir {output_dir}: {folder / 'a_file'} is a file"


CASES = [registry_not_json, unknown_dataset, missing_data_file, bad_json, bad_jsonl_line, missing_column,
         empty_dataset, missing_image, corrupt_image, truncated_image, unknown_problem_type,
         multiple_choice_without_options, missing_solution, non_utf8_text, wrong_parquet_schema,
         horizon_not_positive, output_beneath_a_file]
# batch sizes that do not divide (by ranks, by micro-batch) are checked at this level in
# tests/step2/test_arguments.py::test_main_rejects_bad_flags_before_loading_anything


def test_the_base_dataset_is_valid(tmp_path, monkeypatch):
    """Every case above breaks one thing; without it the same files load (so each error is the fault's)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    for file_name in ("train.json", "train.jsonl", "train.parquet"):
        registry, _ = write_dataset(tmp_path / file_name, good_rows(), file_name=file_name)
        rows = load_rows("d", registry)
        assert [row["id"] for row in rows] == ["1", "2", "3"] and all(len(row["images"]) == 1 for row in rows)


def command_line(tmp_path, tiny_assets, case):
    registry, data_path, flags, output_dir, message = case(tmp_path / "data")
    output_dir = output_dir or tmp_path / "run"
    argv = ["--model-path", tiny_assets["model"], "--registry", registry, "--data-path", data_path,
            "--output-dir", str(output_dir), "--variant", "grpo", "--rollout-batch-size", "2", "--num-generations", "2",
            "--micro-batch-size", "4", "--max-steps", "2", "--save-every", "1", *flags]
    return argv, output_dir, message


def assert_one_error_line(stderr, message, output_dir):
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert message in errors[0], errors[0]
    assert stderr.rstrip().endswith(errors[0]) and "Traceback" not in stderr
    if os.path.isdir(output_dir):
        assert os.listdir(output_dir) == []  # nothing a later run or a reader could take for results


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_malformed_input_is_one_error_line_exit_2_and_no_outputs(tmp_path, tiny_assets, case, capsys, monkeypatch):
    """main() in this process (the checks run before anything distributed); the subprocess test below shows the
    same path from the command line."""
    import datasets

    from step2_trust_grpo.main import main

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv, output_dir, message = command_line(tmp_path, tiny_assets, case)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert_one_error_line(capsys.readouterr().err, message, output_dir)


@pytest.mark.parametrize("case", [missing_image, output_beneath_a_file], ids=lambda case: case.__name__)
def test_from_the_command_line_bad_input_exits_2_in_seconds_without_importing_deepspeed(tmp_path, tiny_assets, case):
    argv, output_dir, message = command_line(tmp_path, tiny_assets, case)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(tmp_path / "hf_cache"))
    start = time.monotonic()
    result = subprocess.run([sys.executable, os.path.join(REPO, "step2_trust_grpo", "main.py"), *argv], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr[-3000:]
    assert_one_error_line(result.stderr, message, output_dir)
    assert "Setting accelerator" not in result.stderr  # DeepSpeed was never imported
    assert elapsed < 30
