"""VLMEvalKit benchmark TSVs (MMBench_DEV_EN.tsv, MME.tsv, ChartQA_TEST.tsv, ...) in, VLMEvalKit-like result TSVs out.

Columns read: `index`, `question`, `answer`, optional `hint`, option columns `A`, `B`, ..., `problem_type` (overrides
the inferred type), and images as base64 in `image` (one image, or a Python-literal list of several) or, when the file
has no `image` column, as paths in `image_path` (one, or a list). As in VLMEvalKit, an `image` cell of at most 64
characters is the `index` of another row whose image it shares (MME stores each image once this way), and when
`image` exists `image_path` is only a name (MME groups the two questions of an image by it).
"""
import ast
import base64
import binascii
import csv
import io
import math
import os
import string

from sophiavl.utils.cli import InputError
from sophiavl.utils.prompts import PROBLEM_TYPES, check_image_placeholders

MAX_REFERENCE_CHARS = 64  # VLMEvalKit's rule: a shorter image cell names a row, a real base64 image is longer
REQUIRED_COLUMNS = ("index", "question", "answer")


def read_vlmeval_tsv(tsv_path, name, image_base_path=None):
    """Rows as utils.data.load_rows returns them ("id" is the TSV's index), plus "hint" (str or None),
    "image_key" (what MME's acc+ groups by) and "source" (the row's cells except `image`, for the result TSV).
    Paths in `image_path` resolve against `image_base_path` (default: the TSV's folder)."""
    records = _read_table(tsv_path)
    columns = list(records[0])
    for column in REQUIRED_COLUMNS:
        if column not in columns:
            raise InputError(f"{tsv_path}: no {column!r} column (columns: {', '.join(columns)})")
    where = [f"{tsv_path}: row {number} (index {record['index']})" for number, record in enumerate(records)]
    seen = {}
    for number, record in enumerate(records):
        if record["index"] in seen:
            raise InputError(f"{where[number]}: index repeats row {seen[record['index']]}")
        seen[record["index"]] = number
    base = image_base_path or os.path.dirname(os.path.abspath(tsv_path))
    if "image" in columns:
        images, owners = _base64_images(records, where)
    else:
        images = [_path_images(record.get("image_path", ""), base, at) for record, at in zip(records, where)]
        owners = [record["index"] for record in records]
    option_letters = [letter for letter in string.ascii_uppercase if letter in columns]
    return [_normalise(record, name, option_letters, refs, owner, at)
            for record, refs, owner, at in zip(records, images, owners, where)]


def result_tsv(rows, predictions, scores):
    """Text of the result TSV: the input columns without the base64 `image` (as in VLMEvalKit's result files), then
    `prediction` and `score`; every cell quoted, as VLMEvalKit's dump does."""
    columns = [column for column in rows[0]["source"] if column not in ("prediction", "score")]
    text = io.StringIO()
    writer = csv.writer(text, delimiter="\t", quoting=csv.QUOTE_ALL, lineterminator="\n")
    writer.writerow(columns + ["prediction", "score"])
    for row, prediction, score in zip(rows, predictions, scores):
        writer.writerow([row["source"].get(column, "") for column in columns] + [prediction["prediction"], score])
    return text.getvalue()


def _read_table(tsv_path):
    if not os.path.isfile(tsv_path):
        raise InputError(f"{tsv_path}: benchmark TSV not found")
    import pandas as pd

    try:
        # All cells as text, empty ones as "": answers like "1.50" or "None" stay what the file says.
        table = pd.read_csv(tsv_path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"{tsv_path}: not a readable TSV ({str(err).strip().splitlines()[0]})") from None
    if table.empty:
        raise InputError(f"{tsv_path}: benchmark TSV has no rows")
    return table.to_dict("records")


def _list_cell(cell):
    """VLMEvalKit's toliststr: "['a', 'b']" -> ["a", "b"]; anything else is one item."""
    if len(cell) > 1 and cell[0] == "[" and cell[-1] == "]":
        value = ast.literal_eval(cell)  # ValueError, SyntaxError (RecursionError when absurdly nested) if malformed
        return [str(item) for item in value]
    return [cell]


def _base64_images(records, where):
    """Per row, the decoded image bytes of its `image` cell and the index of the row that holds them (itself, or the
    row its cell refers to)."""
    number_of = {record["index"]: number for number, record in enumerate(records)}
    decoded = {}  # row number -> its images; rows referring to it share the same bytes objects
    images, owners = [], []
    for number, record in enumerate(records):
        cell = record["image"].strip()
        owner = number
        if 0 < len(cell) <= MAX_REFERENCE_CHARS:
            owner = number_of.get(cell)
            if owner is None or len(records[owner]["image"].strip()) <= MAX_REFERENCE_CHARS:
                raise InputError(f"{where[number]}: image cell {cell!r} refers to an index that holds no image")
        if owner not in decoded:
            decoded[owner] = _decode_cell(records[owner]["image"].strip(), where[owner])
        images.append([{"path": None, "bytes": data} for data in decoded[owner]])
        owners.append(records[owner]["index"])
    return images, owners


def _decode_cell(cell, where):
    if not cell:
        return []
    try:
        items = _list_cell(cell)
    except (ValueError, SyntaxError, RecursionError):
        raise InputError(f"{where}: image cell starts with '[' but is no Python list of base64 strings") from None
    decoded = []
    for position, item in enumerate(items):
        try:
            data = base64.b64decode("".join(item.split()), validate=True)
        except (binascii.Error, ValueError):
            raise InputError(f"{where}: image {position} is not valid base64") from None
        _verify_image(io.BytesIO(data), f"{where}: image {position} is base64 but")
        decoded.append(data)
    return decoded


def _verify_image(file, failure):
    """verify() checks the file's structure without decoding pixels: bad images fail at load, not mid-run."""
    from PIL import Image

    try:
        with Image.open(file) as image:
            image.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # what PIL raises on bad files
        raise InputError(f"{failure} no readable image ({err})") from None


def _path_images(cell, base, where):
    if not cell.strip():
        return []
    try:
        paths = [os.path.join(base, os.path.expanduser(path)) for path in _list_cell(cell.strip())]
    except (ValueError, SyntaxError, RecursionError):
        raise InputError(f"{where}: image_path starts with '[' but is no Python list of paths") from None
    for path in paths:
        if not os.path.isfile(path):
            raise InputError(f"{where}: image file not found: {path}")
        _verify_image(path, f"{where}: {path} is")
    return [{"path": path, "bytes": None} for path in paths]


def _normalise(record, name, option_letters, images, image_owner, where):
    question, answer = record["question"], record["answer"].strip()
    if not question.strip():
        raise InputError(f"{where}: empty 'question'")
    if not answer:
        raise InputError(f"{where}: empty 'answer'")
    filled = [letter for letter in option_letters if record[letter].strip()]
    if filled != list(string.ascii_uppercase[:len(filled)]):
        raise InputError(f"{where}: option columns {', '.join(filled)} skip a letter")
    options = [f"{letter}. {record[letter]}" for letter in filled]
    problem_type = record.get("problem_type", "").strip() or _infer_problem_type(answer, options)
    if problem_type not in PROBLEM_TYPES:
        raise InputError(f"{where}: unknown problem_type {problem_type!r} (known: {', '.join(PROBLEM_TYPES)})")
    if problem_type == "multiple choice" and not options:
        raise InputError(f"{where}: multiple choice row without options (columns A, B, ...)")
    check_image_placeholders(question, len(images), where)
    return {
        "id": record["index"],
        "dataset": name,
        "prompt": question,
        "answer": answer,
        "problem_type": problem_type,
        "options": options,
        "images": images,
        "data_source": name,
        "hint": record.get("hint", "").strip() or None,
        # MME's acc+ pairs the questions of one image: by image_path when the file has it (as VLMEvalKit does)
        "image_key": record.get("image_path") or image_owner,
        "source": {column: cell for column, cell in record.items() if column != "image"},
    }


def _infer_problem_type(answer, options):
    if options:
        return "multiple choice"
    try:
        return "numerical" if math.isfinite(float(answer)) else "free-form"
    except ValueError:
        return "free-form"
