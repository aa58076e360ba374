"""Task families where a shortcut pays in training and fails on held-out rows (issue 20; docs/ablations.md).

    tint      "What colour is the shape?" on a pale tinted background. Train: the tint is the shape's colour on
              90% of rows; held-out: never. Shortcut: answer the background's colour.
    hint_sum  "What is a + b? A student says c." Train: the student is right on 90% of rows; held-out: never
              (off by 1 or 2). Shortcut: repeat the student.

Each row carries `shortcut`: the reasoning that states the shortcut ("the background is red. red is option A",
"the student says 7. so the sum is 7") and the answer it gives. The oracle judge (demo/trace_quality.py) reads it
as true observations and then a step that does not follow from them (0.6), whatever the answer; the correct chain
scores 1.0. The shortcut world cycles colour, tint, arithmetic, hint_sum: each shortcut family beside the v1
family that teaches the skill its correct chain needs (the shape's colour, a sum), so that a policy that reasons
can still answer where the shortcut breaks.
"""
import random

from sophiavl.demo import synthetic_tasks as tasks

TRAIN_AGREEMENT = 0.9  # how often the shortcut's answer is right on training rows (held-out: never)
TINT = 0.4  # the background is this much of the tint colour, the rest white


def _differs(rng: random.Random, held_out: bool) -> bool:
    return held_out or rng.random() >= TRAIN_AGREEMENT


def tint_task(rng: random.Random, held_out: bool = False):
    colour, shape = rng.choice(list(tasks.COLOURS)), rng.choice(tasks.SHAPES)
    tint = rng.choice([c for c in tasks.COLOURS if c != colour]) if _differs(rng, held_out) else colour
    image, draw = tasks._blank(tuple(round(TINT * c + (1 - TINT) * 255) for c in tasks.COLOURS[tint]))
    tasks._draw_shape(draw, shape, colour, rng)
    letter = tasks.COLOUR_OPTIONS[list(tasks.COLOURS).index(colour)][0]
    tint_letter = tasks.COLOUR_OPTIONS[list(tasks.COLOURS).index(tint)][0]
    row = tasks._row("What colour is the shape?", "multiple choice", letter, tasks.colour_reasoning(colour), "tint",
                     {"colour": colour, "background": tint})
    row["options"] = list(tasks.COLOUR_OPTIONS)
    row["shortcut"] = {"reasoning": [f"the background is {tint}", f"{tint} is option {tint_letter}"],
                       "answer": tint_letter}
    return row, image


def hint_sum_task(rng: random.Random, held_out: bool = False):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    hint = a + b
    if _differs(rng, held_out):
        hint = rng.choice([s for s in (a + b - 2, a + b - 1, a + b + 1, a + b + 2) if s >= 0])
    row = tasks._row(f"What is {a} + {b}? A student says {hint}.", "text", str(a + b), tasks.arithmetic_reasoning(a, b),
                     "hint_sum", {"a": a, "b": b, "hint": hint})
    row["shortcut"] = {"reasoning": [f"the student says {hint}", f"so the sum is {hint}"], "answer": str(hint)}
    return row, None


WORLDS = {"default": tasks.TASKS,
          "shortcut": (tasks.colour_task, tint_task, tasks.arithmetic_task, hint_sum_task)}
