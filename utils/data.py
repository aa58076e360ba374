"""Datasets by name: the `dataset_info.json` registry, JSON / JSONL / Parquet rows, and their images.

A registry maps a name to {"file_path", "image_base_path", "columns": {file column: "prompt" | "answer" | "images"}}.
Relative paths resolve against the registry's folder; a missing image_base_path means that folder.
"""
import functools
import io
import json
import logging
import math
import os
import random
import re

from sophiavl.utils.cli import InputError
from sophiavl.utils.prompts import PROBLEM_TYPES, check_image_placeholders

DATA_EXTENSIONS = (".json", ".jsonl", ".parquet")
logger = logging.getLogger(__name__)


def load_registry(registry_file):
    """Read `dataset_info.json` into {name: {"file_path", "image_base_path", "columns"}} with absolute paths."""
    if not os.path.isfile(registry_file):
        raise InputError(f"{registry_file}: dataset registry not found")
    try:
        with open(registry_file, encoding="utf-8") as f:
            entries = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{registry_file}: not valid JSON ({err})") from None
    if not isinstance(entries, dict):
        raise InputError(f"{registry_file}: must be a JSON object mapping dataset names to entries")
    folder = os.path.dirname(os.path.abspath(registry_file))
    registry = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict) or not entry.get("file_path"):
            raise InputError(f"{registry_file}: dataset {name!r} has no file_path")
        registry[name] = {
            "file_path": os.path.join(folder, os.path.expanduser(entry["file_path"])),
            "image_base_path": os.path.join(folder, os.path.expanduser(entry.get("image_base_path") or "")),
            "columns": dict(entry.get("columns") or {}),
        }
    return registry


def load_rows(data_path, registry_file):
    """Load and normalise the rows of the registry names in `data_path` ("A,B": A's rows, then B's).

    Each row: {"id", "dataset", "prompt", "answer", "problem_type", "options", "images", "data_source"}, where "id" is
    the problem_id column when present, else "NAME:INDEX", and "images" is a list of {"path", "bytes"} (images are
    checked to exist and verified here, decoded later by open_images). Rows with data_type "text" or no image are
    text-only.
    Without a problem_type column the type is inferred: options present -> "multiple choice", an answer that parses as
    a number -> "numerical", otherwise "free-form".
    """
    registry = load_registry(registry_file)
    names = [name.strip() for name in data_path.split(",") if name.strip()]
    if not names:
        raise InputError(f"--data-path {data_path!r} names no dataset of {registry_file}")
    rows = []
    for name in names:
        if name not in registry:
            raise InputError(f"{registry_file}: unknown dataset {name!r} (known: {', '.join(sorted(registry))})")
        entry = registry[name]
        records = _read_records(entry["file_path"])
        if not records:
            raise InputError(f"{entry['file_path']}: dataset {name!r} has no rows")
        records = [{entry["columns"].get(key, key): value for key, value in record.items()} for record in records]
        present = set().union(*records)
        for required in ("prompt", "answer"):
            if required not in present:
                raise InputError(f"{entry['file_path']}: row 0: no {required!r} column after renaming by the registry's"
                                 f" columns {entry['columns']} (columns after renaming: {sorted(present)})")
        rows += [_normalise(record, index, name, entry) for index, record in enumerate(records)]
    return rows


def max_images_per_prompt(data_path, registry_file):
    """The most images any row of these datasets has, at least 1: the images-per-request cap a TRM server
    needs for step 2's requests, which carry all of a prompt's images."""
    return max([1] + [len(row["images"]) for row in load_rows(data_path, registry_file)])


def open_images(row):
    """Decode a row's images (from bytes or path) into RGB PIL images, in order."""
    from PIL import Image

    images = []
    for ref in row["images"]:
        try:
            with Image.open(io.BytesIO(ref["bytes"]) if ref["bytes"] is not None else ref["path"]) as image:
                images.append(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # what PIL raises on bad files
            raise InputError(f"dataset {row['dataset']}, row id {row['id']}: cannot read image {ref['path']} ({err})")
    return images


class ReadableRows:
    """Opens the images of the rows a step uses, replacing a row whose images cannot be decoded.

    A JPEG cut short inside its pixel data passes the load-time verify() and fails only here. Dropping it would leave
    its rank with fewer prompts than the others (ZeRO-3's collectives need the same micro-batches on every rank), and
    failing would meet it again on resume. Its replacement is the next row of the data (index + 1, + 2, ...,
    wrapping) that has images and whose images decode: a function of the data alone, so every rank and a resumed
    run pick the same one. Each bad row is warned about once and not decoded again; `replaced` counts every
    replacement (data/bad_rows). fatal=True raises the InputError instead.
    """

    def __init__(self, rows: list, fatal: bool = False):
        self.rows, self.fatal = rows, fatal
        self.index = {id(row): i for i, row in enumerate(rows)}
        self.unreadable = set()
        self.replaced = 0

    def open(self, picked: list) -> tuple[list, list]:
        """(rows, images) for `picked` (rows of self.rows), each bad row swapped for its replacement; images as
        open_images returns them."""
        used, images = [], []
        for row in picked:
            start, errors = self.index[id(row)], []
            for offset in range(len(self.rows)):
                candidate = self.rows[(start + offset) % len(self.rows)]
                if id(candidate) in self.unreadable or (offset and not candidate["images"]):
                    continue
                try:
                    images.append(open_images(candidate))
                    break
                except InputError as err:
                    if self.fatal:
                        raise
                    self.unreadable.add(id(candidate))
                    errors.append(str(err))
            else:
                raise InputError(f"dataset {row['dataset']}: no row with images left that can be read")
            used.append(candidate)
            self.replaced += candidate is not row
            for error in errors:
                logger.warning("%s; replaced by row id %s (the next readable one; --fatal-bad-rows stops instead)",
                               error, candidate["id"])
        return used, images


def _read_records(file_path):
    extension = os.path.splitext(file_path)[1].lower()
    if extension not in DATA_EXTENSIONS:
        raise InputError(f"{file_path}: unsupported file extension {extension!r} (use {', '.join(DATA_EXTENSIONS)})")
    if not os.path.isfile(file_path):
        raise InputError(f"{file_path}: data file not found")
    import datasets

    try:
        dataset = datasets.load_dataset("parquet" if extension == ".parquet" else "json", data_files=file_path,
                                        split="train")
        # to_list, unlike dataset[i], leaves an Image feature as an undecoded {"bytes", "path"} dict. It is inside the
        # try because datasets stores non-UTF-8 JSON text as it is and only fails here.
        return dataset.to_list()
    except Exception as err:  # datasets/pyarrow raise many types; the message below names the file instead
        if extension == ".parquet":
            raise InputError(f"{file_path}: not a readable Parquet file ({str(err).splitlines()[0]})") from None
        # Also reached for valid JSON that older datasets refuse: a column that is 5 in one row and "x" in another.
        return _read_json_records(file_path, extension)


def _read_json_records(file_path, extension):
    """Parse a JSON list or JSON Lines file with our own error messages (line numbers are 1-based)."""
    with open(file_path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise InputError(f"{file_path}: line {line} is not UTF-8 text (byte {err.start})") from None
    records = None
    if extension == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            if not text.lstrip().startswith("{"):  # else it may be JSON Lines saved as .json
                raise InputError(f"{file_path}: line {err.lineno} is not valid JSON ({err.msg})") from None
    if records is None:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise InputError(f"{file_path}: line {number} is not valid JSON ({err.msg})") from None
    if not isinstance(records, list):
        raise InputError(f"{file_path}: must hold a JSON list of objects or one JSON object per line")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise InputError(f"{file_path}: row {index} (0-based index) is not a JSON object")
    return records


def _normalise(record, index, name, entry):
    problem_id = record.get("problem_id")
    id_note = "" if problem_id is None else f", problem_id {problem_id}"
    where = f"{entry['file_path']}: row {index} (0-based index{id_note})"
    file_column = {role: column for column, role in entry["columns"].items()}
    prompt, answer = record.get("prompt"), record.get("answer")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{where}: missing or empty prompt (column {file_column.get('prompt', 'prompt')!r})")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise InputError(f"{where}: missing or empty answer (column {file_column.get('answer', 'answer')!r})")
    options = record.get("options") or []
    if not isinstance(options, list):
        raise InputError(f"{where}: options must be a list, got {type(options).__name__}")
    options = [str(option) for option in options]
    problem_type = record.get("problem_type") or _infer_problem_type(answer, options)
    if problem_type not in PROBLEM_TYPES:
        raise InputError(f"{where}: unknown problem_type {problem_type!r} (known: {', '.join(PROBLEM_TYPES)})")
    if problem_type == "multiple choice" and not options:
        raise InputError(f"{where}: multiple choice row without options")
    if record.get("data_type") == "text":
        images = []
    elif "images" in record:
        images = _image_refs(record["images"], entry["image_base_path"], where)
    elif record.get("data_type") == "image":
        raise InputError(f"{where}: data_type is 'image' but no column maps to 'images' in the registry")
    else:
        images = []
    check_image_placeholders(prompt, len(images), where)
    return {
        "id": str(problem_id) if problem_id is not None else f"{name}:{index}",
        "dataset": name,
        "prompt": prompt,
        "answer": answer,
        "problem_type": problem_type,
        "options": options,
        "images": images,
        "data_source": str(record.get("data_source") or name),
    }


def _infer_problem_type(answer, options):
    if options:
        return "multiple choice"
    wrapped = re.search(r"<answer>(.*?)</answer>", answer, re.DOTALL)
    text = (wrapped.group(1) if wrapped else answer).strip().strip("$").strip()
    try:
        return "numerical" if math.isfinite(float(text)) else "free-form"
    except ValueError:
        return "free-form"


def _image_refs(value, image_base_path, where):
    """Accept a path, a {"bytes", "path"} dict (HF Image feature) or a list of either; None or "" means no image."""
    refs = []
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, str):
            item = {"bytes": None, "path": item}
        elif item is not None and not isinstance(item, dict):
            raise InputError(f"{where}: an image must be a path or a {{bytes, path}} dict, not {type(item).__name__}")
        if not item or not (item.get("bytes") or item.get("path")):
            continue
        path = os.path.join(image_base_path, item["path"]) if item.get("path") else None
        if not item.get("bytes") and not os.path.isfile(path):
            raise InputError(f"{where}: image file not found: {path}")
        refs.append({"path": path, "bytes": item.get("bytes") or None})
        _check_image(refs[-1], where)
    return refs


def _check_image(ref, where):
    """Fail at load time, not hours into a run, on files that are not images or are cut short.

    PIL's verify() reads the header (PNG: every chunk and its CRC) without decoding pixels: ~0.3-1 ms an image.
    It cannot see a JPEG truncated inside its pixel data; open_images reports that one when it is first used.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(ref["bytes"]) if ref["bytes"] is not None else ref["path"]) as image:
            image.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # what PIL raises on bad files
        raise InputError(f"{where}: cannot read image {ref['path']} ({err})") from None


@functools.lru_cache(maxsize=4)
def epoch_order(num_rows: int, seed: int) -> tuple:
    """A seeded permutation of the row indices. Training loops index it by a function of the step, so a
    resumed run finds its place without sampler state; cached, as a step reads only a slice of it."""
    order = list(range(num_rows))
    random.Random(seed).shuffle(order)
    return tuple(order)


def read_jsonl_objects(path: str):
    """(where, row) for each non-empty line of a JSONL file, `where` being "file:line"; a line that is not
    UTF-8 JSON or not an object is an InputError naming both."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise InputError(f"{where}: not a valid UTF-8 JSON line ({err})") from None
            if not isinstance(row, dict):
                raise InputError(f"{where}: a row must be a JSON object")
            yield where, row
