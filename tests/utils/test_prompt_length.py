import logging

import pytest
from PIL import Image

from sophiavl.utils.cli import InputError
from sophiavl.utils.model import chat_inputs, load_processor
from sophiavl.utils.prompt_length import drop_over_long, prompt_lengths, sharded_prompt_lengths
from sophiavl.utils.prompts import policy_messages
from sophiavl.utils.vision import resize_images

# min 3,136 and max 12,544 pixels, patch 14 x merge 2 = 28: smart_resize by hand
#   20x30:   28x28 = 784 < 3,136 -> beta = sqrt(600 / 3136): ceil(30 / beta / 28) = 3, ceil(20 / beta / 28) = 2 ->
#            84x56 pixels = 6 tokens of 28x28
#   112x112: within the limits, already on the grid -> 4x4 = 16 tokens
#   500x300: 308x504 > 12,544 -> beta = sqrt(150000 / 12544): floor(300 / beta / 28) = 3, floor(500 / beta / 28) = 5
#            -> 84x140 pixels = 15 tokens
SIZES = [(20, 30), (112, 112), (500, 300)]
TOKENS = [6, 16, 15]
VISION_MARKS = 2  # <|vision_start|> and <|vision_end|> around each image's tokens


@pytest.fixture(scope="module")
def processor(tiny_assets):
    return load_processor(tiny_assets["model"], 3136, 12544)


def image_row(tmp_path, row_id, sizes, prompt="How many shapes are there?", dataset="d"):
    refs = []
    for k, size in enumerate(sizes):
        path = tmp_path / f"{row_id}_{k}.png"
        Image.new("RGB", size, (200, 30, 30)).save(path)
        refs.append({"path": str(path), "bytes": None})
    return {"id": row_id, "dataset": dataset, "prompt": prompt, "problem_type": "numerical", "options": [],
            "images": refs}


def policy_chat(row):
    return policy_messages(row["prompt"], row["problem_type"], row["options"], len(row["images"]))


def test_prompt_length_counts_each_image_by_its_resized_grid(processor, tmp_path):
    rows = [image_row(tmp_path, "none", []), image_row(tmp_path, "one", SIZES[:1]), image_row(tmp_path, "three", SIZES)]
    lengths = prompt_lengths(processor, rows, policy_chat)

    text_only = len(processor.tokenizer(processor.apply_chat_template(policy_chat(rows[0]), tokenize=False,
                                                                      add_generation_prompt=True))["input_ids"])
    assert lengths == [text_only, text_only + VISION_MARKS + 6,
                       text_only + 3 * VISION_MARKS + sum(TOKENS)]
    # what the model gets: the processor's own input_ids, from the images as the engines see them (resized)
    for row, length in zip(rows, lengths):
        images = [Image.open(ref["path"]) for ref in row["images"]]
        real = chat_inputs(processor, [policy_chat(row)], [resize_images(images, processor)])["input_ids"]
        assert real.shape[1] == length
    assert sharded_prompt_lengths(processor, rows, policy_chat) == lengths  # one process: no sharding


def test_image_bytes_are_measured_and_an_image_no_grid_fits_names_its_row(processor, tmp_path):
    row = image_row(tmp_path, "b", SIZES[1:2])
    with open(row["images"][0]["path"], "rb") as f:
        in_bytes = dict(row, images=[{"path": None, "bytes": f.read()}])
    assert prompt_lengths(processor, [in_bytes], policy_chat) == prompt_lengths(processor, [row], policy_chat)

    thin = image_row(tmp_path, "thin", [(4200, 20)])  # aspect ratio 210 > 200: smart_resize refuses it
    with pytest.raises(InputError, match=r"dataset d, row id thin: an image of 4200x20 pixels: .*200"):
        prompt_lengths(processor, [row, thin], policy_chat)


def test_over_long_prompts_are_dropped_and_reported_in_one_line(caplog):
    rows = [{"id": f"{name}{k}", "dataset": name} for name in ("A", "B") for k in range(3)]
    lengths = [10, 41, 40, 70, 5, 55]
    with caplog.at_level(logging.WARNING):
        kept = drop_over_long(rows, lengths, 40, "--max-prompt-length", "--data-path A,B")
    assert [row["id"] for row in kept] == ["A0", "A2", "B1"]  # 40 is within the limit
    assert [record.getMessage() for record in caplog.records] == [
        "--data-path A,B: dropped 3 of 6 prompts longer than --max-prompt-length 40 tokens (A 1, B 2); "
        "the longest, row id B0 of B, has 70 tokens"]

    caplog.clear()
    assert drop_over_long(rows, lengths, 70, "--max-prompt-length", "x") == rows and not caplog.records
    assert drop_over_long(rows, lengths, 40, "--max-prompt-length", "x", log=False) == kept and not caplog.records
    with pytest.raises(InputError, match=r"^--data-path A,B: all 6 prompts are longer than --max-prompt-length 4 "
                                         r"tokens \(the shortest has 5\)$"):
        drop_over_long(rows, lengths, 4, "--max-prompt-length", "--data-path A,B")


def test_prompts_that_surely_fit_are_bounded_and_those_that_may_not_are_counted_exactly(processor, tmp_path):
    """With at_most, an ASCII prompt's characters bound its tokens (Qwen's byte-level BPE); only the prompts whose
    bound is over the limit are tokenized. The decision is the exact lengths' own."""
    rows = [image_row(tmp_path, f"r{k}", SIZES[:k % 3], prompt="Is it red? " * k) for k in (0, 1, 2, 3, 10, 200, 250)]
    rows.append(image_row(tmp_path, "accents", [], prompt="Quelle est la réponse ? " * 80))  # not ASCII: exact
    exact = prompt_lengths(processor, rows, policy_chat)
    limit = max(prompt_lengths(processor, rows, policy_chat, at_most=10**9)[:4])  # the largest bound of r0-r3
    bounded = prompt_lengths(processor, rows, policy_chat, at_most=limit)
    assert [b > limit for b in bounded] == [e > limit for e in exact] == [False] * 5 + [True, True, True]
    assert bounded[:4] != exact[:4] and all(b > e for b, e in zip(bounded[:4], exact[:4]))  # bounds, not counts
    assert bounded[4:] == exact[4:]  # r10's bound is over the limit, so it is counted: it fits
