"""Synthetic tasks a from-scratch tiny Qwen2.5-VL can learn on a CPU, as SophiaVL-R1-130k rows.

One task per problem type, drawn on 112x112 images with PIL: the colour of a big shape
(multiple choice), counting 1-4 large squares (numerical), a 1-3 letter word in big glyphs
(OCR), naming one shape "red circle" (free-form), one-digit sums (text only). Each row also
carries `reasoning`: the correct short steps, from which thinking traces are built, and `facts`: what the
image and question hold (the colour, the squares, the operands, ...), from which the oracle judge
(demo/trace_quality.py) checks any trace.
Everything depends only on (seed, split, index), so a build is reproducible byte for byte.
"""
import functools
import random

from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 112
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
# A fixed option order: the tiny model only has to map a colour to its letter.
COLOUR_OPTIONS = ["A. red", "B. green", "C. blue", "D. yellow"]
SHAPES = ("circle", "square", "triangle")
WORDS = ("A", "I", "GO", "UP", "NO", "CAT", "DOG", "SUN", "BOX")
SQUARE_CELLS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
BACKGROUND = (255, 255, 255)


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: nothing to download


def _blank(background=BACKGROUND) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    return image, ImageDraw.Draw(image)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: str, rng: random.Random) -> None:
    size = rng.randint(56, 80)
    left = rng.randint(8, IMAGE_SIZE - 8 - size)
    top = rng.randint(8, IMAGE_SIZE - 8 - size)
    box = (left, top, left + size, top + size)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(left + size // 2, top), (left, top + size), (left + size, top + size)], fill=fill)


def colour_reasoning(colour: str) -> list[str]:
    letter = COLOUR_OPTIONS[list(COLOURS).index(colour)][0]
    return [f"the shape is {colour}", f"{colour} is option {letter}"]


def counting_reasoning(positions: list[str]) -> list[str]:
    noun = "square" if len(positions) == 1 else "squares"
    return [f"a square at the {position}" for position in positions] + [f"that makes {len(positions)} {noun}"]


def word_reasoning(word: str) -> list[str]:
    return [f"the letters are {' '.join(word)}", f"they spell {word}"]


def description_reasoning(colour: str, shape: str) -> list[str]:
    return [f"the colour is {colour}", f"the shape is a {shape}"]


def arithmetic_reasoning(a: int, b: int) -> list[str]:
    return [f"{a} plus {b} is {a + b}"]


def colour_task(rng: random.Random, held_out: bool = False) -> tuple[dict, Image.Image]:
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    image, draw = _blank()
    _draw_shape(draw, shape, colour, rng)
    letter = COLOUR_OPTIONS[list(COLOURS).index(colour)][0]
    row = _row("What colour is the shape?", "multiple choice", letter, colour_reasoning(colour), "colour",
               {"colour": colour, "background": "white"})
    row["options"] = list(COLOUR_OPTIONS)
    return row, image


def counting_task(rng: random.Random, held_out: bool = False) -> tuple[dict, Image.Image]:
    count = rng.randint(1, 4)
    chosen = set(rng.sample(list(SQUARE_CELLS), count))
    positions = [name for name in SQUARE_CELLS if name in chosen]  # reading order
    image, draw = _blank()
    for name in positions:
        column, line = SQUARE_CELLS[name]
        size = rng.randint(30, 38)
        left = column * 56 + rng.randint(4, 52 - size)
        top = line * 56 + rng.randint(4, 52 - size)
        draw.rectangle((left, top, left + size, top + size), fill=(30, 30, 30))
    row = _row("How many squares are there?", "numerical", str(count), counting_reasoning(positions), "count",
               {"squares": positions})
    return row, image


def word_task(rng: random.Random, held_out: bool = False) -> tuple[dict, Image.Image]:
    word = rng.choice(WORDS)
    image, draw = _blank()
    centre = (IMAGE_SIZE // 2 + rng.randint(-6, 6), IMAGE_SIZE // 2 + rng.randint(-6, 6))
    draw.text(centre, word, fill=(0, 0, 0), font=_font(rng.randint(38, 44)), anchor="mm")
    row = _row("What word is written in the image?", "OCR", word, word_reasoning(word), "word", {"word": word})
    return row, image


def description_task(rng: random.Random, held_out: bool = False) -> tuple[dict, Image.Image]:
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    image, draw = _blank()
    _draw_shape(draw, shape, colour, rng)
    row = _row("Describe the shape.", "free-form", f"{colour} {shape}", description_reasoning(colour, shape), "describe",
               {"colour": colour, "shape": shape})
    return row, image


def arithmetic_task(rng: random.Random, held_out: bool = False) -> tuple[dict, None]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return _row(f"What is {a} + {b}?", "text", str(a + b), arithmetic_reasoning(a, b), "arithmetic", {"a": a, "b": b}), None


TASKS = (colour_task, counting_task, word_task, description_task, arithmetic_task)  # the same in every split


def _row(problem: str, problem_type: str, answer: str, reasoning: list[str], source: str, facts: dict) -> dict:
    return {
        "problem": problem,
        "data_type": "text" if problem_type == "text" else "image",
        "problem_type": problem_type,
        "options": [],
        "solution": f"<answer>{answer}</answer>",
        "data_source": f"tiny_synthetic/{source}",
        "reasoning": reasoning,
        "facts": facts,
    }


def make_rows(num_rows: int, seed: int, split: str, tasks=TASKS) -> list[tuple[dict, Image.Image | None]]:
    """`num_rows` (row, image) pairs cycling through `tasks` (the five task types by default; a world of
    demo/shortcut_tasks.py). Splits other than "train" are held out (where a shortcut family's shortcut breaks).
    problem_id is "<split>_<index>"; image rows get path "<problem_id>.png" (relative to the image folder),
    text rows path ""."""
    pairs = []
    for index in range(num_rows):
        rng = random.Random(f"tiny-{split}-{seed}-{index}")  # str seeds hash stably across runs
        row, image = tasks[index % len(tasks)](rng, split != "train")
        name = f"{split}_{index:05d}"  # unique across splits, so train and test can be loaded together
        path = f"{name}.png" if image is not None else ""
        columns = ("problem", "data_type", "problem_type", "options", "solution")
        ordered = {"problem_id": name, **{key: row[key] for key in columns}, "path": path,
                   "data_source": row["data_source"], "reasoning": row["reasoning"], "facts": row["facts"],
                   **({"shortcut": row["shortcut"]} if "shortcut" in row else {})}
        pairs.append((ordered, image))
    return pairs
