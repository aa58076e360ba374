import io
import json
import re

import datasets
import pytest
from PIL import Image

from sophiavl.utils.cli import InputError
from sophiavl.utils.data import load_registry, load_rows, max_images_per_prompt, open_images

SOPHIA_COLUMNS = {"problem": "prompt", "solution": "answer", "path": "images"}


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def png_bytes(color, mode="RGB"):
    buffer = io.BytesIO()
    Image.new(mode, (4, 3), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path, color, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(color, mode))


def write_registry(folder, entries):
    folder.mkdir(parents=True, exist_ok=True)
    registry_file = folder / "dataset_info.json"
    registry_file.write_text(json.dumps(entries))
    return str(registry_file)


def sophia_row(problem_id, **changes):
    row = {"problem_id": problem_id, "problem": f"What is shown in picture {problem_id}?", "data_type": "image",
           "problem_type": "free-form", "options": [], "solution": "<answer>a square</answer>", "path": "a.png",
           "data_source": "synthetic"}
    row.update(changes)
    return row


def sophia_json(tmp_path, rows, file_name="train.json"):
    """A registry with one dataset `sophia` whose rows are `rows`, and images/a.png present."""
    write_png(tmp_path / "images" / "a.png", (255, 0, 0))
    data_file = tmp_path / file_name
    if file_name.endswith(".jsonl"):
        data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        data_file.write_text(json.dumps(rows))
    registry = write_registry(tmp_path, {"sophia": {"file_path": file_name, "image_base_path": "images",
                                                    "columns": SOPHIA_COLUMNS}})
    return registry, str(data_file)


def test_json_list_of_sophia_rows_with_relative_paths_and_a_text_only_row(tmp_path):
    write_png(tmp_path / "shared" / "imgs" / "a.png", (0, 0, 255))
    rows = [sophia_row(17, path="imgs/a.png", problem_type="multiple choice", options=["A. red", "B. blue"],
                       solution="<answer>B</answer>", data_source="ChartQA"),
            sophia_row(18, data_type="text", path="not/used.png", problem_type="numerical", solution="<answer>4</answer>")]
    (tmp_path / "cfg" / "data").mkdir(parents=True)
    (tmp_path / "cfg" / "data" / "train.json").write_text(json.dumps(rows))
    registry = write_registry(tmp_path / "cfg", {"sophia": {"file_path": "data/train.json",
                                                            "image_base_path": "../shared", "columns": SOPHIA_COLUMNS}})

    loaded = load_rows("sophia", registry)

    assert loaded == [
        {"id": "17", "dataset": "sophia", "prompt": "What is shown in picture 17?", "answer": "<answer>B</answer>",
         "problem_type": "multiple choice", "options": ["A. red", "B. blue"],
         "images": [{"path": str(tmp_path / "cfg" / "../shared" / "imgs/a.png"), "bytes": None}],
         "data_source": "ChartQA"},
        {"id": "18", "dataset": "sophia", "prompt": "What is shown in picture 18?", "answer": "<answer>4</answer>",
         "problem_type": "numerical", "options": [], "images": [], "data_source": "synthetic"},
    ]
    [image] = open_images(loaded[0])
    assert (image.mode, image.size, image.getpixel((0, 0))) == ("RGB", (4, 3), (0, 0, 255))
    assert open_images(loaded[1]) == []


def test_registry_resolves_relative_paths_against_its_folder_and_keeps_absolute_ones(tmp_path):
    registry = write_registry(tmp_path / "cfg", {
        "rel": {"file_path": "d/x.jsonl", "image_base_path": "imgs", "columns": {"q": "prompt"}},
        "abs": {"file_path": "/data/y.parquet"},
    })
    assert load_registry(registry) == {
        "rel": {"file_path": str(tmp_path / "cfg" / "d/x.jsonl"), "image_base_path": str(tmp_path / "cfg" / "imgs"),
                "columns": {"q": "prompt"}},
        "abs": {"file_path": "/data/y.parquet", "image_base_path": str(tmp_path / "cfg") + "/", "columns": {}},
    }


def test_jsonl_with_column_mapping_and_several_names_keep_their_order(tmp_path):
    for name in ("b1.png", "b2.png"):
        write_png(tmp_path / "pics" / name, (0, 255, 0))
    (tmp_path / "first.jsonl").write_text('{"question": "q0", "label": 7}\n\n{"question": "q1", "label": "x"}\n')
    (tmp_path / "second.jsonl").write_text(json.dumps({"question": "q2", "label": "y", "image": ["b1.png", "b2.png"]}))
    columns = {"question": "prompt", "label": "answer", "image": "images"}
    registry = write_registry(tmp_path, {
        "first": {"file_path": "first.jsonl", "columns": columns},
        "second": {"file_path": "second.jsonl", "image_base_path": "pics", "columns": columns},
    })

    loaded = load_rows("second, first", registry)

    assert [(row["id"], row["dataset"], row["prompt"], row["answer"]) for row in loaded] == [
        ("second:0", "second", "q2", "y"), ("first:0", "first", "q0", "7"), ("first:1", "first", "q1", "x")]
    assert loaded[0]["images"] == [{"path": str(tmp_path / "pics" / "b1.png"), "bytes": None},
                                   {"path": str(tmp_path / "pics" / "b2.png"), "bytes": None}]
    assert [row["images"] for row in loaded[1:]] == [[], []]
    assert [row["problem_type"] for row in loaded] == ["free-form", "numerical", "free-form"]
    assert loaded[1]["data_source"] == "first"  # no data_source column: the dataset name


def test_parquet_with_hf_image_feature_dicts(tmp_path):
    features = datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "picture": datasets.Image(), "more": datasets.List(datasets.Image())})
    records = [
        {"question": "colour?", "answer": "red", "picture": {"bytes": png_bytes((255, 0, 0)), "path": "red.png"},
         "more": [{"bytes": png_bytes(128, mode="L"), "path": None}]},
        {"question": "text only", "answer": "42", "picture": None, "more": []},
    ]
    datasets.Dataset.from_list(records, features=features).to_parquet(str(tmp_path / "train.parquet"))
    registry = write_registry(tmp_path, {"pq": {"file_path": "train.parquet", "image_base_path": "/nowhere",
                                                "columns": {"question": "prompt", "picture": "images"}}})

    first, second = load_rows("pq", registry)

    assert first["images"] == [{"path": "/nowhere/red.png", "bytes": png_bytes((255, 0, 0))}]
    assert (second["images"], second["problem_type"]) == ([], "numerical")
    [image] = open_images(first)
    assert (image.mode, image.getpixel((3, 2))) == ("RGB", (255, 0, 0))

    registry = write_registry(tmp_path, {"pq": {"file_path": "train.parquet",
                                                "columns": {"question": "prompt", "more": "images"}}})
    [gray] = open_images(load_rows("pq", registry)[0])
    assert (gray.mode, gray.getpixel((0, 0))) == ("RGB", (128, 128, 128))


@pytest.mark.parametrize("solution, options, expected", [
    ("<answer>3.5</answer>", [], "numerical"),
    ("$12$", [], "numerical"),
    ("-2", [], "numerical"),
    ("inf", [], "free-form"),
    ("<answer>a red square</answer>", [], "free-form"),
    ("<answer>B</answer>", ["A. 1", "B. 2"], "multiple choice"),
])
def test_problem_type_is_inferred_when_the_column_is_absent(tmp_path, solution, options, expected):
    row = sophia_row(1, solution=solution, options=options)
    del row["problem_type"]
    registry, _ = sophia_json(tmp_path, [row])
    assert load_rows("sophia", registry)[0]["problem_type"] == expected


def test_json_whose_column_changes_type_between_rows_still_loads(tmp_path):
    # pyarrow refuses a column that is a number in one row and a string in the next; plain json takes it.
    registry, _ = sophia_json(tmp_path, [sophia_row(1, solution=5, problem_type="numerical"), sophia_row(2)])
    assert [row["answer"] for row in load_rows("sophia", registry)] == ["5", "<answer>a square</answer>"]


# ---- errors: every message names the file and, for row errors, the row ----

def test_registry_errors_name_the_registry_file(tmp_path):
    missing = str(tmp_path / "nope" / "dataset_info.json")
    with pytest.raises(InputError, match=re.escape(missing) + ": dataset registry not found"):
        load_registry(missing)
    (tmp_path / "dataset_info.json").write_text("{not json")
    with pytest.raises(InputError, match=re.escape(str(tmp_path / "dataset_info.json")) + ": not valid JSON"):
        load_registry(str(tmp_path / "dataset_info.json"))
    registry = write_registry(tmp_path, {"ok": {"file_path": "a.json"}, "broken": {"image_base_path": "x"}})
    with pytest.raises(InputError, match=re.escape(registry) + ": dataset 'broken' has no file_path"):
        load_registry(registry)


def test_unknown_dataset_name_lists_the_known_ones(tmp_path):
    registry, _ = sophia_json(tmp_path, [sophia_row(1)])
    with pytest.raises(InputError, match=re.escape(registry) + r": unknown dataset 'chart' \(known: sophia\)"):
        load_rows("sophia,chart", registry)


def test_missing_data_file_and_unsupported_extension(tmp_path):
    registry = write_registry(tmp_path, {"gone": {"file_path": "gone.jsonl"}, "csv": {"file_path": "t.csv"}})
    (tmp_path / "t.csv").write_text("prompt,answer\nq,a\n")
    with pytest.raises(InputError, match=re.escape(str(tmp_path / "gone.jsonl")) + ": data file not found"):
        load_rows("gone", registry)
    with pytest.raises(InputError, match=re.escape(str(tmp_path / "t.csv")) + ": unsupported file extension '.csv'"):
        load_rows("csv", registry)


def test_bad_json_reports_the_first_bad_line(tmp_path):
    registry, data_file = sophia_json(tmp_path, [sophia_row(1), sophia_row(2), sophia_row(3)], "train.jsonl")
    lines = open(data_file).read().splitlines()
    lines[1] = lines[1][:-1]  # line 2 loses its closing brace
    open(data_file, "w").write("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=re.escape(data_file) + ": line 2 is not valid JSON"):
        load_rows("sophia", registry)

    registry, data_file = sophia_json(tmp_path, [sophia_row(1)], "train.json")
    open(data_file, "w").write('[\n  {"problem": "q",\n   "solution": "a" "b"}\n]\n')
    with pytest.raises(InputError, match=re.escape(data_file) + ": line 3 is not valid JSON"):
        load_rows("sophia", registry)


def test_non_utf8_json_names_the_line(tmp_path):
    registry, data_file = sophia_json(tmp_path, [sophia_row(1)], "train.jsonl")
    with open(data_file, "ab") as f:
        f.write(json.dumps(sophia_row(2, problem="caf\u00e9?"), ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(InputError, match=re.escape(data_file) + ": line 2 is not UTF-8 text"):
        load_rows("sophia", registry)


@pytest.mark.parametrize("file_name, content", [("empty.jsonl", ""), ("empty.json", "[]")])
def test_empty_dataset(tmp_path, file_name, content):
    (tmp_path / file_name).write_text(content)
    registry = write_registry(tmp_path, {"empty": {"file_path": file_name}})
    with pytest.raises(InputError, match=re.escape(str(tmp_path / file_name)) + ": dataset 'empty' has no rows"):
        load_rows("empty", registry)


def test_missing_required_column_after_mapping(tmp_path):
    registry, data_file = sophia_json(tmp_path, [sophia_row(1)])
    write_registry(tmp_path, {"sophia": {"file_path": "train.json", "columns": {"problem": "prompt"}}})
    with pytest.raises(InputError, match=re.escape(data_file) + ": row 0: no 'answer' column"):
        load_rows("sophia", registry)


def test_unreadable_parquet(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    registry = write_registry(tmp_path, {"bad": {"file_path": "bad.parquet"}})
    with pytest.raises(InputError, match=re.escape(str(tmp_path / "bad.parquet")) + ": not a readable Parquet file"):
        load_rows("bad", registry)


@pytest.mark.parametrize("bad_row, message", [
    (sophia_row(7, path="missing.png"), "image file not found: .*missing.png"),
    (sophia_row(7, problem_type="essay"), "unknown problem_type 'essay'"),
    (sophia_row(7, problem_type="multiple choice", options=[]), "multiple choice row without options"),
    (sophia_row(7, solution=""), "missing or empty answer \\(column 'solution'\\)"),
    (sophia_row(7, solution=None), "missing or empty answer \\(column 'solution'\\)"),
    (sophia_row(7, problem="  "), "missing or empty prompt \\(column 'problem'\\)"),
    (sophia_row(7, problem="<image> left, <image> right?"),
     "the prompt holds 2 <image> placeholder\\(s\\) but the row has 1 image\\(s\\)"),
    (sophia_row(7, problem="<image> what?", data_type="text"),
     "the prompt holds 1 <image> placeholder\\(s\\) but the row has 0 image\\(s\\)"),
])
def test_bad_row_names_file_index_and_problem_id(tmp_path, bad_row, message):
    registry, data_file = sophia_json(tmp_path, [sophia_row(6), bad_row])
    with pytest.raises(InputError, match=re.escape(data_file) + r": row 1 \(0-based index, problem_id 7\): " + message):
        load_rows("sophia", registry)


def test_prompts_with_one_placeholder_per_image_load_as_they_are(tmp_path):
    for name in ("b1.png", "b2.png"):
        write_png(tmp_path / "pics" / name, (0, 255, 0))
    rows = [{"problem": "Left <image>, right <image>: same colour?", "answer": "yes", "images": ["b1.png", "b2.png"]},
            {"problem": "<image>What colour?", "answer": "green", "images": ["b1.png"]},
            {"problem": "No placeholder here", "answer": "green", "images": ["b1.png", "b2.png"]}]
    (tmp_path / "easy.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    registry = write_registry(tmp_path, {"easy": {"file_path": "easy.jsonl", "image_base_path": "pics",
                                                  "columns": {"problem": "prompt"}}})
    loaded = load_rows("easy", registry)
    assert [(r["prompt"], len(r["images"])) for r in loaded] == [(r["problem"], len(r["images"])) for r in rows]
    assert max_images_per_prompt("easy", registry) == 2  # the TRM server's cap for this data


def test_max_images_per_prompt_of_text_only_data_is_one(tmp_path):
    registry, _ = sophia_json(tmp_path, [sophia_row(1, data_type="text"), sophia_row(2, data_type="text")])
    assert max_images_per_prompt("sophia", registry) == 1


def test_image_row_without_an_images_column(tmp_path):
    registry, data_file = sophia_json(tmp_path, [sophia_row(1)])
    write_registry(tmp_path, {"sophia": {"file_path": "train.json", "columns": {"problem": "prompt",
                                                                                "solution": "answer"}}})
    with pytest.raises(InputError, match=re.escape(data_file) + r": row 0 \(0-based index, problem_id 1\): data_type"):
        load_rows("sophia", registry)


def test_open_images_rejects_truncated_and_corrupt_images(tmp_path):
    registry, _ = sophia_json(tmp_path, [sophia_row(3)])
    [row] = load_rows("sophia", registry)
    image_path = tmp_path / "images" / "a.png"
    image_path.write_bytes(image_path.read_bytes()[:40])
    with pytest.raises(InputError, match=r"dataset sophia, row id 3: cannot read image " + re.escape(str(image_path))):
        open_images(row)

    row = dict(row, images=[{"path": "/x/in_parquet.png", "bytes": b"\x89PNG garbage"}])
    with pytest.raises(InputError, match=r"dataset sophia, row id 3: cannot read image /x/in_parquet.png"):
        open_images(row)
