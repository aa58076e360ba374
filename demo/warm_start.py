"""Warm-start SFT of the tiny policy (demo only, not one of the three stages).

A random-init model cannot reason, so before RL the tiny run teaches it the
`<think>...</think><answer>...</answer>` format on the synthetic tasks. Labels are right only
`--correct-fraction` of the time and otherwise wrong in a *systematic* way (red -> green,
3 -> 4, 6 + 3 -> 10, ...): the model then keeps real probability on the right answer while greedy
decoding prefers the wrong one, which is what gives GRPO something to fix. Labels wrong at
random leave RL nothing to gain (docs/cpu_notes.md). On the shortcut families (demo/shortcut_tasks.py) the
target is the shortcut's trace ("the background is red. red is option A") `--shortcut-fraction` of the time,
so the policy starts out using the shortcut often.

    python demo/warm_start.py --model DIR/model --train DIR/data/tiny_train.json --output OUT
"""
import argparse
import json
import math
import os
import random
import shutil
import time

import torch
from PIL import Image
from tqdm import tqdm

from sophiavl.demo import synthetic_tasks as tasks
from sophiavl.utils.model import chat_inputs, load_model, load_processor
from sophiavl.utils.prompts import policy_messages

COLOUR_SLIP = {"red": "green", "green": "blue", "blue": "yellow", "yellow": "red"}


def answer_of(row: dict) -> str:
    return row["solution"].removeprefix("<answer>").removesuffix("</answer>")


def confused(row: dict) -> tuple[list[str], str]:
    """The task's systematic mistake: (reasoning, answer) that look sound but are wrong."""
    kind, answer = row["data_source"].split("/")[-1], answer_of(row)
    if kind in ("colour", "tint"):
        colour = COLOUR_SLIP[row["reasoning"][0].split()[-1]]
        return tasks.colour_reasoning(colour), tasks.COLOUR_OPTIONS[list(tasks.COLOURS).index(colour)][0]
    if kind == "count":
        count = int(answer) + 1
        return row["reasoning"][:-1] + [f"that makes {count} squares"], str(count)
    if kind == "word":
        word = tasks.WORDS[(tasks.WORDS.index(answer) + 1) % len(tasks.WORDS)]
        return tasks.word_reasoning(word), word
    if kind == "describe":
        colour, shape = answer.split()
        return tasks.description_reasoning(COLOUR_SLIP[colour], shape), f"{COLOUR_SLIP[colour]} {shape}"
    a, b = (int(x) for x in row["problem"].removeprefix("What is ").split("?")[0].split(" + "))  # arithmetic, hint_sum
    return [f"{a} plus {b} is {a + b + 1}"], str(a + b + 1)


def target_text(row: dict, rng: random.Random, correct_fraction: float, shortcut_fraction: float = 0.0) -> str:
    if "shortcut" in row and rng.random() < shortcut_fraction:
        reasoning, answer = row["shortcut"]["reasoning"], row["shortcut"]["answer"]
    elif rng.random() < correct_fraction:
        reasoning, answer = row["reasoning"], answer_of(row)
    else:
        reasoning, answer = confused(row)
    return f"<think>{'. '.join(reasoning)}.</think><answer>{answer}</answer>"


def sft_batch(processor, rows: list[dict], images: list[list], targets: list[str]) -> dict:
    """Prompt (training template, left-padded) + target + <|im_end|>; labels only on the target."""
    chats = [policy_messages(r["problem"], r["problem_type"], r["options"], len(i)) for r, i in zip(rows, images)]
    batch = dict(chat_inputs(processor, chats, images))
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [processor.tokenizer.encode(t, add_special_tokens=False) + [end] for t in targets]
    width = max(len(x) for x in ids)
    target = torch.full((len(ids), width), processor.tokenizer.pad_token_id)
    labels = torch.full((len(ids), width), -100)
    for i, x in enumerate(ids):
        target[i, :len(x)] = labels[i, :len(x)] = torch.tensor(x)
    prompt_len = batch["input_ids"].shape[1]
    batch["input_ids"] = torch.cat([batch["input_ids"], target], 1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], (labels != -100).long()], 1)
    batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(target)], 1)
    batch["labels"] = torch.cat([torch.full((len(ids), prompt_len), -100), labels], 1)
    return batch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="tiny random-init model directory")
    parser.add_argument("--train", required=True, help="tiny_train.json (rows with `reasoning`)")
    parser.add_argument("--output", required=True, help="where to save the warm-started policy")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--correct-fraction", type=float, default=0.45)
    parser.add_argument("--shortcut-fraction", type=float, default=0.0,
                        help="on rows with a shortcut (demo/shortcut_tasks.py): how often the target is its trace")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    processor = load_processor(args.model)
    model = load_model(args.model, torch.float32).train()
    with open(args.train) as f:
        rows = json.load(f)
    image_dir = os.path.join(os.path.dirname(os.path.abspath(args.train)), "images")
    images = [[Image.open(os.path.join(image_dir, r["path"])).convert("RGB")] if r["path"] else [] for r in rows]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps)))

    start = time.perf_counter()
    progress = tqdm(range(args.steps), desc="warm start")
    for _ in progress:
        picks = rng.choices(range(len(rows)), k=args.batch_size)
        batch = sft_batch(processor, [rows[i] for i in picks], [images[i] for i in picks],
                          [target_text(rows[i], rng, args.correct_fraction, args.shortcut_fraction) for i in picks])
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.3f}")
    # saved aside and renamed: its config.json is the pipeline's "done" marker (utils/pipeline.py)
    tmp = f"{args.output}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    shutil.rmtree(args.output, ignore_errors=True)
    os.replace(tmp, args.output)
    print(f"warm start: {args.steps} steps in {time.perf_counter() - start:.0f} s, final loss {loss.item():.3f}; "
          f"saved {args.output}")


if __name__ == "__main__":
    main()
