import io
import json
import logging
import re

import datasets
import pytest
from PIL import Image

from sophiavl.utils.cli import InputError
from sophiavl.utils.data import ReadableRows, load_rows


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def cut_jpeg(path):
    """A real JPEG's first 60% of bytes: the header is whole (verify() passes), the pixel data is not."""
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buffer, format="JPEG", quality=90)
    path.write_bytes(buffer.getvalue()[: int(0.6 * len(buffer.getvalue()))])


@pytest.fixture
def rows(tmp_path):
    """Rows 0..6: ok, cut, text-only, ok, cut, ok, cut (the last one wraps round to row 0)."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(images / "ok.png")
    for name in ("cut1.jpg", "cut4.jpg", "cut6.jpg"):
        cut_jpeg(images / name)
    paths = ["ok.png", "cut1.jpg", None, "ok.png", "cut4.jpg", "ok.png", "cut6.jpg"]
    records = [{"problem_id": f"r{k}", "problem": f"question {k}", "solution": "1", "path": path}
               | ({} if path else {"data_type": "text"}) for k, path in enumerate(paths)]
    (tmp_path / "d.json").write_text(json.dumps(records))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_path": "d.json", "image_base_path": "images",
                                                                  "columns": {"problem": "prompt", "solution": "answer",
                                                                              "path": "images"}}}))
    return load_rows("d", str(tmp_path / "dataset_info.json"))  # the cut JPEGs pass the load-time verify()


def ids(rows):
    return [row["id"] for row in rows]


def test_a_row_that_cannot_be_decoded_is_replaced_by_the_next_readable_row_with_images(rows, caplog):
    data = ReadableRows(rows)
    with caplog.at_level(logging.WARNING):
        used, images = data.open([rows[0], rows[1], rows[2], rows[4], rows[6]])
    # 1 -> 3 (2 is text-only), 4 -> 5, 6 wraps to 0; a text-only row is used as it is
    assert ids(used) == ["r0", "r3", "r2", "r5", "r0"]
    assert [len(i) for i in images] == [1, 1, 0, 1, 1] and images[1][0].size == (8, 8)
    assert data.replaced == 3
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 3
    assert re.fullmatch(r"dataset d, row id r1: cannot read image \S+/cut1\.jpg \(image file is truncated.*\); "
                        r"replaced by row id r3 \(the next readable one; --fatal-bad-rows stops instead\)", warnings[0])

    caplog.clear()
    with caplog.at_level(logging.WARNING):  # met again: the same replacement, counted, not warned about again
        assert ids(data.open([rows[4], rows[1]])[0]) == ["r5", "r3"]
    assert data.replaced == 5 and not caplog.records


def test_replacements_are_a_function_of_the_data_alone(rows):
    """Another rank, or a resumed run, starts with no knowledge of the bad rows and picks the same rows."""
    picks = [[rows[6], rows[5], rows[1]], [rows[4], rows[4], rows[3]]]
    seen_before = ReadableRows(rows)
    seen_before.open(rows)
    for picked in picks:
        fresh = ReadableRows(rows)
        used = fresh.open(picked)[0]
        assert ids(used) == ids(seen_before.open(picked)[0])
        assert len(used) == len(picked)  # every rank keeps its number of prompts
    assert ids(ReadableRows(rows).open(picks[0])[0]) == ["r0", "r5", "r3"]


def test_fatal_bad_rows_raises_the_decoding_error(rows):
    data = ReadableRows(rows, fatal=True)
    assert ids(data.open([rows[0]])[0]) == ["r0"]
    with pytest.raises(InputError, match=r"^dataset d, row id r4: cannot read image \S+/cut4\.jpg \(image file is "
                                         r"truncated"):
        data.open([rows[4]])
