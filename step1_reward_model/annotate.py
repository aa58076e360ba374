"""Label policy rollouts with a judge model behind an OpenAI-compatible endpoint (the paper: Qwen2.5-VL-72B).

    python step1_reward_model/annotate.py --input rollouts.jsonl --output labels.jsonl \
        --judge-url http://localhost:8000/v1 --judge-model Qwen2.5-VL-72B-Instruct

Input JSONL rows: id (optional), question, response, images (paths relative to --image-base, else to the
input file's folder), and any other fields (problem_type, answer, ...), which are passed through.
Output rows: the input fields + id, score (float or null), judge_text, status ("scored" | "failed"), error.
Resumable: results are appended as they arrive; a rerun skips ids already scored and retries failed ones,
then rewrites the file with one row per id.
"""
import argparse
import asyncio
import hashlib
import json
import logging
import os

import jsonlines
from PIL import Image
from tqdm import tqdm

from sophiavl.utils.cli import InputError, exit_on_input_error
from sophiavl.utils.data import read_jsonl_objects
from sophiavl.utils.outputs import prepare_output_dir
from sophiavl.utils.trm_client import TRMClient

if not __package__:  # run as a script (`deepspeed step1_reward_model/annotate.py`, or a copy of the folder)
    from sophiavl.utils.stage import stage_package
    __package__ = stage_package(__file__)

from .data import checked_judge_row

logger = logging.getLogger("annotate")

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="rollouts JSONL")
    parser.add_argument("--output", required=True, help="labels JSONL (appended to; resumable)")
    parser.add_argument("--judge-url", required=True, help="e.g. http://host:8000/v1 or .../v1/chat/completions")
    parser.add_argument("--judge-model", required=True, help="served model name")
    parser.add_argument("--image-base", default=None, help="folder of relative image paths (default: input's folder)")
    parser.add_argument("--max-concurrency", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=120, help="seconds per request")
    parser.add_argument("--max-retries", type=int, default=3)
    parser.add_argument("--backoff", type=float, default=0.5, help="first retry delay in seconds (doubles)")
    parser.add_argument("--max-tokens", type=int, default=16, help="judge completion length")
    parser.add_argument("--no-vllm-sampling-fields", dest="vllm_sampling", action="store_false",
                    help="the judge is not a vLLM server: send only OpenAI's sampling fields (by default top_k, "
                    "min_p and repetition_penalty are pinned too, so a vLLM judge never applies its checkpoint's "
                    "generation defaults)")
    args = parser.parse_args(argv)
    if args.max_concurrency < 1:
        raise InputError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.timeout <= 0:
        raise InputError(f"--timeout must be > 0, got {args.timeout}")
    if args.max_retries < 0:
        raise InputError(f"--max-retries must be >= 0, got {args.max_retries}")
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise InputError("--output must differ from --input")
    if os.path.isdir(args.output):
        raise InputError(f"--output {args.output} is a directory, not a JSONL file")
    return args


def stable_id(row: dict) -> str:
    key = json.dumps([row["question"], row["response"], row.get("images") or []], ensure_ascii=False)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def read_input(path: str, image_base: str | None) -> list[tuple[dict, list[str], str]]:
    """Validated input as (row with "id" set, resolved image paths, "file:line"); identical repeats dropped."""
    if not os.path.isfile(path):
        raise InputError(f"--input {path}: file not found")
    image_base = image_base or os.path.dirname(os.path.abspath(path))
    items, seen = [], {}
    for where, row in read_jsonl_objects(path):
        images, paths = checked_judge_row(row, where, image_base)
        row["images"] = images
        row["id"] = stable_id(row) if row.get("id") in (None, "") else str(row["id"])
        content = (row["question"], row["response"], images)
        if row["id"] in seen:
            if seen[row["id"]] != content:
                raise InputError(f"{where}: id {row['id']!r} repeats with different content")
            continue  # the same rollout twice: label it once
        seen[row["id"]] = content
        items.append((row, paths, where))
    return items


def read_output(path: str) -> list[dict]:
    """Rows already written; a last line cut short by a crash is ignored (it is redone)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                if not isinstance(row, dict) or "id" not in row or "status" not in row:
                    raise ValueError("not an annotation row")
            except ValueError as err:
                if not raw.endswith(b"\n"):  # the last line, cut off by a crash
                    logger.warning("%s:%d: ignoring a partly written last row", path, line_no)
                    continue
                raise InputError(f"{path}:{line_no}: not an annotation row ({err})") from None
            rows.append(row)
    return rows


def compact(path: str, order: list[str]) -> None:
    """Rewrite `path` with one row per id (a scored row wins over failed ones), atomically."""
    best = {}
    for row in read_output(path):
        previous = best.get(row["id"])
        if previous is None or previous["status"] != "scored":
            best[row["id"]] = row
    ids = [i for i in order if i in best] + [i for i in best if i not in set(order)]
    tmp = f"{path}.tmp-{os.getpid()}"
    with jsonlines.open(tmp, "w") as writer:
        for row_id in ids:
            writer.write(best[row_id])
    os.replace(tmp, path)


def drop_partial_last_line(path: str) -> None:
    """Cut a last line left unfinished by a crash, so appended rows start on a line of their own."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        position = end
        while position > 0:
            chunk_start = max(0, position - 65536)
            f.seek(chunk_start)
            chunk = f.read(position - chunk_start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                position = chunk_start + newline + 1
                break
            position = chunk_start
        if position < end:
            f.truncate(position)


def open_images(paths: list[str], where: str) -> list[Image.Image]:
    images = []
    for image_path in paths:
        try:
            with Image.open(image_path) as image:
                images.append(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise InputError(f"{where}: cannot read image {image_path} ({err})") from None
    return images


async def annotate(items: list, client: TRMClient, writer, concurrency: int) -> dict:
    """Score items with `concurrency` workers, writing each result as soon as it arrives."""
    counts = {"scored": 0, "failed": 0}
    pending = iter(items)
    bar = tqdm(total=len(items), desc="annotate", unit="row")

    async def worker():
        for row, paths, where in pending:  # one shared iterator: each item goes to one worker
            images = await asyncio.to_thread(open_images, paths, where)
            result = await client.score(row["question"], row["response"], images)
            status = "scored" if result.score is not None else "failed"
            writer.write({**row, "score": result.score, "judge_text": result.text, "status": status,
                          "error": result.error})
            counts[status] += 1
            bar.update(1)
            bar.set_postfix(failed=counts["failed"], refresh=False)

    tasks = [asyncio.create_task(worker()) for _ in range(min(concurrency, max(len(items), 1)))]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # re-raise the first failure (an unreadable image)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bar.close()
        await client.aclose()
    return counts


@exit_on_input_error
def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    client = TRMClient(args.judge_url, args.judge_model, max_concurrency=args.max_concurrency,
                       timeout_s=args.timeout, max_retries=args.max_retries, backoff_s=args.backoff,
                       max_tokens=args.max_tokens, vllm_sampling=args.vllm_sampling)
    items = read_input(args.input, args.image_base)
    prepare_output_dir(os.path.dirname(os.path.abspath(args.output)), flag="--output")
    done = {row["id"] for row in read_output(args.output) if row["status"] == "scored"}
    todo = [item for item in items if item[0]["id"] not in done]
    skipped = len(items) - len(todo)
    logger.info("%d rows: %d already scored, %d to label with %s at %s",
                len(items), skipped, len(todo), args.judge_model, client.base_url)
    drop_partial_last_line(args.output)
    with jsonlines.open(args.output, "a", flush=True) as writer:
        counts = asyncio.run(annotate(todo, client, writer, args.max_concurrency))
    compact(args.output, [row["id"] for row, _, _ in items])
    counts["skipped"] = skipped
    print(f"scored {counts['scored']} / failed {counts['failed']} / skipped {counts['skipped']}")
    return counts


if __name__ == "__main__":
    main()
