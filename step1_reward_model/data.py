"""TRM SFT data: labelled JSONL rows (annotate.py / balance.py / demo/trm_traces.py) -> model batches.

One example is the TRM chat of utils.prompts.trm_messages (the judge sees in training exactly what it sees
when it scores) followed by the assistant turn `<answer>0.7</answer><|im_end|>`. Only that span carries
loss: system and user turns, image tokens and padding get label -100.
"""
import hashlib
import json
import logging
import math
import os
import random

import torch

from sophiavl.utils.cli import InputError
from sophiavl.utils.data import open_images, read_jsonl_objects
from sophiavl.utils.model import chat_inputs
from sophiavl.utils.prompt_length import sharded_prompt_lengths
from sophiavl.utils.prompts import JUDGE_THINKING, trm_messages

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
END_OF_TURN = "<|im_end|>"


def format_score(score: float) -> str:
    """One decimal, the judge's output grammar: 0.74 -> "0.7", 1 -> "1.0"."""
    return f"{round(10 * score) / 10:.1f}"


def target_text(score: float) -> str:
    return f"<answer>{format_score(score)}</answer>"


def read_trm_rows(path: str, image_base: str | None = None) -> list[dict]:
    """Labelled rows as {"id", "question", "response", "score", "images": [{"path", "bytes"}], "dataset"}.

    Image paths are relative to `image_base`, else to the file's folder. Rows that annotate.py could not
    score (status "failed", score null) are skipped and counted; anything else malformed is an InputError.
    """
    if not os.path.isfile(path):
        raise InputError(f"{path}: labelled JSONL not found")
    image_base = image_base or os.path.dirname(os.path.abspath(path))
    rows, unscored = [], 0
    for where, record in read_jsonl_objects(path):
        if record.get("status", "scored") != "scored" or record.get("score") is None:
            unscored += 1
            continue
        rows.append(_trm_row(record, where, image_base, os.path.basename(path)))
    if unscored:
        logger.warning("%s: skipped %d rows without a score (status failed)", path, unscored)
    if not rows:
        raise InputError(f"{path}: no scored rows")
    return rows


def checked_judge_row(record: dict, where: str, image_base: str) -> tuple[list[str], list[str]]:
    """Check a judged row's question, response and images (shared with annotate.py); returns the image
    paths as written (a single string becomes a list) and resolved against `image_base`, all existing."""
    for field in ("question", "response"):
        if not isinstance(record.get(field), str):
            raise InputError(f"{where}: missing or non-string field {field!r}")
    images = record.get("images") or []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise InputError(f"{where}: 'images' must be a list of paths")
    paths = [os.path.join(image_base, image) for image in images]
    for image_path in paths:
        if not os.path.isfile(image_path):
            raise InputError(f"{where}: image not found: {image_path}")
    return images, paths


def _trm_row(record: dict, where: str, image_base: str, dataset: str) -> dict:
    _, paths = checked_judge_row(record, where, image_base)
    score = record["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) \
            or not 0 <= score <= 1:
        raise InputError(f"{where}: score must be a number in [0, 1], got {score!r}")
    refs = [{"path": image_path, "bytes": None} for image_path in paths]
    row_id = str(record["id"]) if record.get("id") not in (None, "") else where
    return {"id": row_id, "question": record["question"], "response": record["response"], "score": float(score),
            "images": refs, "dataset": dataset}


def question_key(row: dict) -> str:
    return hashlib.sha256(json.dumps([row["question"], [r["path"] for r in row["images"]]]).encode()).hexdigest()


def split_by_question(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `fraction` of the questions (with all their responses), so evaluation never sees a
    question the judge trained on, and the held-out set keeps pairs for pairwise accuracy."""
    keys = sorted({question_key(row) for row in rows})
    random.Random(seed).shuffle(keys)
    held_out = set(keys[:round(fraction * len(keys))])
    train = [row for row in rows if question_key(row) not in held_out]
    return train, [row for row in rows if question_key(row) in held_out]


def encode_example(processor, row: dict, images: list) -> dict:
    """Token ids of prompt + target, labels -100 everywhere but the target, and the image tensors.

    The target is tokenized on its own and appended after the generation prompt ("...assistant\\n"), which is
    where generation starts when the judge scores, so training and use see the same token boundary; with the
    template's thinking off (JUDGE_THINKING), as the served judge is asked for (utils.trm_client).
    """
    prompt = chat_inputs(processor, [trm_messages(row["question"], row["response"], len(images))], [images],
                         enable_thinking=JUDGE_THINKING)
    target = target_ids(processor.tokenizer, row["score"])
    prompt_ids = prompt["input_ids"][0]
    example = {
        "input_ids": torch.cat([prompt_ids, torch.tensor(target)]),
        "labels": torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), torch.tensor(target)]),
        "mm_token_type_ids": torch.cat([prompt["mm_token_type_ids"][0], torch.zeros(len(target), dtype=torch.long)]),
    }
    if images:
        example["pixel_values"], example["image_grid_thw"] = prompt["pixel_values"], prompt["image_grid_thw"]
    return example


def target_ids(tokenizer, score: float) -> list[int]:
    """The assistant turn's tokens: the score, then <|im_end|>."""
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    return tokenizer.encode(target_text(score), add_special_tokens=False) + [end_of_turn]


def example_lengths(processor, rows: list[dict], at_most: int | None = None) -> list[int]:
    """Tokens of each row's training example (TRM prompt, images included, then the target), measured without
    decoding an image; as in utils.prompt_length, with `at_most` a length within it may be an upper bound."""
    targets = {score: len(target_ids(processor.tokenizer, score)) for score in {row["score"] for row in rows}}
    prompts = sharded_prompt_lengths(
        processor, rows, lambda row: trm_messages(row["question"], row["response"], len(row["images"])),
        None if at_most is None else at_most - max(targets.values()), enable_thinking=JUDGE_THINKING)
    return [prompt + targets[row["score"]] for prompt, row in zip(prompts, rows)]


def collate(examples: list[dict], pad_token_id: int) -> dict:
    """Left-pad into a batch: every target then ends at the last position, so the loss needs only the
    logits of the last `target_width` positions."""
    width = max(len(e["input_ids"]) for e in examples)

    def left_pad(key, value):
        return torch.stack([torch.cat([torch.full((width - len(e[key]),), value, dtype=torch.long), e[key]])
                            for e in examples])

    batch = {
        "input_ids": left_pad("input_ids", pad_token_id),
        "labels": left_pad("labels", IGNORE_INDEX),
        "mm_token_type_ids": left_pad("mm_token_type_ids", 0),
        "attention_mask": torch.stack([torch.cat([torch.zeros(width - len(e["input_ids"]), dtype=torch.long),
                                                  torch.ones(len(e["input_ids"]), dtype=torch.long)])
                                       for e in examples]),
    }
    with_images = [e for e in examples if "pixel_values" in e]
    if with_images:
        batch["pixel_values"] = torch.cat([e["pixel_values"] for e in with_images])
        batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in with_images])
    batch["target_width"] = int((batch["labels"] != IGNORE_INDEX).sum(dim=1).max())
    return batch


def make_batch(processor, rows: list[dict], images: list | None = None) -> dict:
    """The collated batch of `rows`; `images` (one list per row) when the caller already opened them."""
    images = images if images is not None else [open_images(row) for row in rows]
    return collate([encode_example(processor, row, row_images) for row, row_images in zip(rows, images)],
                   processor.tokenizer.pad_token_id)
