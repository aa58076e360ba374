"""TRM SFT: loss masking on real tokenized examples, data order and schedule, and 2-process ZeRO-3 runs."""
import json
import math
import os
import re

import pytest
import torch
from PIL import Image

from step1_reward_model.data import (IGNORE_INDEX, collate, encode_example, format_score, make_batch,
                                     read_trm_rows, split_by_question, question_key)
from step1_reward_model.main import aligned_eval_batches, lr_factor, step_indices, target_losses
from sophiavl.utils.cli import InputError
from sophiavl.utils.data import open_images
from sophiavl.utils.model import load_model, load_processor
from sophiavl.utils.prompts import trm_messages
from sophiavl.utils.outcome_reward import parse_score
from tests.helpers import metrics

pytestmark = pytest.mark.timeout(300)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCORE_TEXT = re.compile(r"<answer>[01]\.\d</answer>")


@pytest.fixture(scope="module")
def processor(tiny_assets):
    return load_processor(tiny_assets["model"])


def labelled(question="What is 2 + 3?", response="<think>2 plus 3 is 5</think><answer>5</answer>", score=0.7,
             images=()):
    return {"id": "x", "question": question, "response": response, "score": score, "dataset": "test",
            "images": [{"path": p, "bytes": None} for p in images]}


def test_loss_covers_exactly_the_assistant_turn_of_a_real_example(processor, tiny_assets):
    image_path = os.path.join(os.path.dirname(tiny_assets["registry"]), "images", "train_00000.png")
    row = labelled("<image> What colour is the shape?", score=0.7, images=[image_path])
    images = open_images(row)
    example = encode_example(processor, row, images)
    ids, labels = example["input_ids"], example["labels"]
    tokenizer = processor.tokenizer

    carried = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    assert carried == list(range(len(ids) - 6, len(ids)))  # one contiguous span at the very end
    assert tokenizer.decode(ids[carried]) == "<answer>0.7</answer><|im_end|>"
    assert labels[carried].tolist() == ids[carried].tolist()
    image_positions = (ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")).nonzero().flatten()
    assert len(image_positions) == 16 and (labels[image_positions] == IGNORE_INDEX).all()
    assert example["mm_token_type_ids"][image_positions].eq(1).all() and example["mm_token_type_ids"][carried].eq(0).all()

    # The same tokens as the whole conversation rendered by the chat template: prompt, then the assistant
    # turn up to its <|im_end|> (the template's trailing newline is not part of the turn).
    chat = trm_messages(row["question"], row["response"], 1) + [
        {"role": "assistant", "content": [{"type": "text", "text": "<answer>0.7</answer>"}]}]
    full_text = processor.apply_chat_template(chat, tokenize=False)
    full = processor(text=[full_text], images=images, return_tensors="pt")["input_ids"][0]
    assert full.tolist() == ids.tolist() + tokenizer.encode("\n", add_special_tokens=False)


def test_collate_left_pads_with_no_loss_and_keeps_images_of_image_rows(processor, tiny_assets):
    image_path = os.path.join(os.path.dirname(tiny_assets["registry"]), "images", "train_00000.png")
    rows = [labelled(score=1.0), labelled("<image> What colour is the shape?", "<think>x</think><answer>D</answer>",
                                          score=0.0, images=[image_path])]
    examples = [encode_example(processor, row, open_images(row)) for row in rows]
    batch = collate(examples, processor.tokenizer.pad_token_id)
    lengths = [len(e["input_ids"]) for e in examples]
    width = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    for row, length in enumerate(lengths):
        pad = width - length
        assert batch["attention_mask"][row].tolist() == [0] * pad + [1] * length
        assert (batch["labels"][row, :pad] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, :pad] == processor.tokenizer.pad_token_id).all()
        assert batch["labels"][row, pad:].tolist() == examples[row]["labels"].tolist()
    assert batch["target_width"] == 6
    assert torch.equal(batch["pixel_values"], examples[1]["pixel_values"])
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]]
    targets = [processor.tokenizer.decode(batch["input_ids"][r, -6:]) for r in range(2)]
    assert targets == ["<answer>1.0</answer><|im_end|>", "<answer>0.0</answer><|im_end|>"]


def test_target_losses_equal_the_full_sequence_cross_entropy(processor, tiny_assets, traces):
    """Only the last target_width logits are computed; the loss must equal the usual shifted loss."""
    model = load_model(tiny_assets["model"], torch.float32)
    batch = make_batch(processor, read_trm_rows(traces)[:5])
    sums, counts = target_losses(model, batch)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "target_width")}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:],
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
    assert counts.tolist() == [6] * 5
    assert sums.sum().item() == pytest.approx(expected.item(), rel=1e-5)


def test_text_only_batches_still_run_the_vision_tower_without_changing_the_loss(processor, tiny_assets):
    model = load_model(tiny_assets["model"], torch.float32)
    batch = make_batch(processor, [labelled()])
    assert "pixel_values" not in batch
    calls = []
    model.model.visual.register_forward_hook(lambda *args: calls.append(1))
    sums, _ = target_losses(model, batch)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "target_width")}
    width = batch["target_width"]
    logits = model(**inputs, use_cache=False).logits[:, -width - 1:-1]
    plain = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, -width:],
                                              ignore_index=IGNORE_INDEX, reduction="sum")
    assert calls == [1]  # the dummy image went through the tower: ZeRO-3 gathers stay matched across ranks
    assert sums.sum().item() == pytest.approx(plain.item(), rel=1e-6)
    sums.sum().backward()
    grads = [p.grad for p in model.model.visual.parameters()]
    assert all(g is not None and not g.any() for g in grads)  # in the graph (ZeRO-3 reduces them), worth zero


def test_format_score_gives_one_decimal():
    assert [format_score(s) for s in (0.0, 0.7, 0.74, 0.76, 1, 0.30000000000000004)] == \
        ["0.0", "0.7", "0.7", "0.8", "1.0", "0.3"]


def test_read_trm_rows_resolves_images_skips_failed_rows_and_names_bad_ones(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
    good = {"question": "q", "response": "r", "score": 0.4, "images": ["img/a.png"], "status": "scored"}
    lines = [good, {**good, "score": None, "status": "failed"}, {**good, "images": [], "id": "t"}]
    (tmp_path / "l.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    rows = read_trm_rows(str(tmp_path / "l.jsonl"))
    assert [r["images"] for r in rows] == [[{"path": str(tmp_path / "img" / "a.png"), "bytes": None}], []]
    assert [r["id"] for r in rows] == [f"{tmp_path / 'l.jsonl'}:1", "t"]
    for bad, message in [({**good, "score": 1.5}, "score must be a number in [0, 1]"),
                         ({**good, "images": ["img/missing.png"]}, "image not found"),
                         ({**good, "response": None}, "field 'response'")]:
        (tmp_path / "bad.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(InputError, match=re.escape("bad.jsonl:2: ") + ".*" + re.escape(message)):
            read_trm_rows(str(tmp_path / "bad.jsonl"))
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "l.jsonl").write_text(json.dumps(good) + "\n")
    assert read_trm_rows(str(other / "l.jsonl"), image_base=str(tmp_path))[0]["images"][0]["path"] == \
        str(tmp_path / "img" / "a.png")


def test_split_holds_out_whole_questions(traces):
    rows = read_trm_rows(traces)
    train, held = split_by_question(rows, 0.2, seed=3)
    assert len(train) + len(held) == len(rows)
    assert not {question_key(r) for r in train} & {question_key(r) for r in held}
    assert len({question_key(r) for r in held}) == round(0.2 * len({question_key(r) for r in rows}))
    assert split_by_question(rows, 0.2, seed=3) == (train, held)
    assert split_by_question(rows, 0.0, seed=3) == (rows, [])


def test_lr_warms_up_linearly_then_decays_by_cosine():
    factors = [lr_factor(step, warmup_steps=2, total_steps=10, min_ratio=0.0) for step in range(11)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert factors[6] == pytest.approx(0.5)  # halfway through the 8 decay steps
    assert factors[4] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert factors[10] == pytest.approx(0.0)
    assert lr_factor(10, 2, 10, 0.1) == pytest.approx(0.1) and lr_factor(0, 0, 10, 0.0) == 1.0


def test_each_epoch_visits_every_row_once_in_a_new_order():
    epoch_1 = [i for step in range(1, 6) for i in step_indices(20, step, steps_per_epoch=5, global_batch=4, seed=0)]
    epoch_2 = [i for step in range(6, 11) for i in step_indices(20, step, steps_per_epoch=5, global_batch=4, seed=0)]
    assert sorted(epoch_1) == sorted(epoch_2) == list(range(20)) and epoch_1 != epoch_2
    assert step_indices(20, 7, 5, 4, 0) == epoch_2[4:8]


def test_eval_batches_match_across_ranks_and_cover_every_row_once():
    rows = [{"id": f"i{k}", "images": [{"path": "p"}]} for k in range(5)] + [{"id": f"t{k}", "images": []}
                                                                             for k in range(3)]
    per_rank = [list(aligned_eval_batches(rows, batch_size=2, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 3  # 5 image rows -> 2 rounds of 2x2, 3 text rows -> 1 round
    for (rows_0, _), (rows_1, _) in zip(*per_rank):
        assert len({bool(r["images"]) for r in rows_0 + rows_1}) == 1  # all ranks with images, or none
    counted = [r["id"] for batches in per_rank for batch, weights in batches for r, w in zip(batch, weights) if w]
    assert sorted(counted) == sorted(r["id"] for r in rows)


@pytest.mark.slow
def test_zero3_run_lowers_the_loss_and_saves_a_judge_that_generates_scores(trained, traces):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from sophiavl.utils.generation import Sampling, hf_generate

    output_dir, log = trained
    train_rows = split_by_question(read_trm_rows(traces), 0.1, seed=1)[0]
    steps_per_epoch = len(train_rows) // 8  # micro-batch 2 x accumulation 2 x 2 ranks
    # The data order is seeded: check that this run really put a text-only micro-batch on one rank
    # while the other had images, the case where ZeRO-3 hangs without the vision keep-alive.
    mixed = 0
    for step in range(1, 2 * steps_per_epoch + 1):
        rows = [train_rows[i] for i in step_indices(len(train_rows), step, steps_per_epoch, 8, seed=1)]
        for micro in range(2):
            has_image = [any(r["images"] for r in rows[(micro * 2 + rank) * 2:(micro * 2 + rank + 1) * 2])
                         for rank in range(2)]
            mixed += has_image[0] != has_image[1]
    assert mixed > 0

    logged = metrics(output_dir)
    assert [m["step"] for m in logged] == list(range(1, 2 * steps_per_epoch + 1))
    first, last = logged[0]["loss"], sum(m["loss"] for m in logged[-5:]) / 5
    assert first > 5 and last < 0.2 * first, (first, last)
    assert logged[-1]["eval/parse_failure_rate"] == 0 and 0 <= logged[-1]["eval/score_mae"] <= 1
    assert json.load(open(output_dir / "eval.json")) == {k: v for k, v in logged[-1].items() if k.startswith("eval/")}
    assert logged[-1]["lr"] < logged[len(logged) // 2]["lr"] < logged[2]["lr"]
    for name in ("args.json", "run_info.json", "tensorboard"):
        assert os.path.exists(output_dir / name)

    final = str(output_dir / "final")
    model = AutoModelForImageTextToText.from_pretrained(final, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(final)
    processor.tokenizer.padding_side = "left"
    held_out = split_by_question(read_trm_rows(traces), 0.1, seed=1)[1][:4]
    images = [open_images(row) for row in held_out]
    chats = [trm_messages(r["question"], r["response"], len(i)) for r, i in zip(held_out, images)]
    texts, _ = hf_generate(model, processor, chats, images, Sampling(max_new_tokens=16))
    # a 66-step tiny judge: every reply must hold a score, and nearly all in the exact trained format
    assert all(parse_score(text) is not None for text in texts), texts
    assert sum(bool(SCORE_TEXT.fullmatch(text)) for text in texts) >= 3, texts
