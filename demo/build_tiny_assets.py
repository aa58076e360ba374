"""Build the tiny demo assets: synthetic tasks in SophiaVL-R1-130k format and a random-init tiny Qwen2.5-VL.

    python demo/build_tiny_assets.py --out DIR [--seed 0] [--num-train 2000] [--num-test 200] [--world default] [--force]

writes DIR/data/images/*.png, DIR/data/tiny_train.json, DIR/data/tiny_test.json,
DIR/data/dataset_info.json (datasets tiny_train and tiny_test) and DIR/model (model, tokenizer,
processor). A second run with the same arguments finds everything in place and does nothing. --world shortcut:
the task families of demo/shortcut_tasks.py (a shortcut that pays on tiny_train and breaks on tiny_test).
"""
import argparse
import json
import os
import shutil
import time

from sophiavl.demo.shortcut_tasks import WORLDS
from sophiavl.demo.synthetic_tasks import make_rows
from sophiavl.demo.tiny_model import build_tiny_model
from sophiavl.utils import prompts
from sophiavl.utils.cli import InputError, exit_on_input_error

COLUMNS = {"problem": "prompt", "solution": "answer", "path": "images"}


def asset_paths(out_dir: str) -> dict:
    data = os.path.join(out_dir, "data")
    return {
        "root": out_dir,
        "data_dir": data,
        "images": os.path.join(data, "images"),
        "train": os.path.join(data, "tiny_train.json"),
        "test": os.path.join(data, "tiny_test.json"),
        "registry": os.path.join(data, "dataset_info.json"),
        "model": os.path.join(out_dir, "model"),
        "build_args": os.path.join(out_dir, "build_args.json"),
    }


def fixed_prompt_texts() -> list[str]:
    """Every verbatim prompt the tiny model will see: the policy template with each type's
    suffix, the evaluation system prompt and the TRM prompt with its system prompt."""
    policy = [prompts.QUESTION_TEMPLATE + suffix for suffix in prompts.TYPE_TEMPLATE.values()]
    return policy + [prompts.EVAL_SYSTEM_PROMPT, prompts.TRM_PROMPT, prompts.TRM_SYSTEM_PROMPT]


def task_texts(rows: list[dict]) -> list[str]:
    """What the tokenizer learns words from: questions, options, answers and reasoning steps."""
    texts = ["<image> "]  # the TRM's question prefix for image rows
    for row in rows:
        texts += [row["problem"], "; ".join(row["options"]), row["solution"], ". ".join(row["reasoning"])]
        texts += [". ".join(row["shortcut"]["reasoning"])] if "shortcut" in row else []
    return texts


def write_data(paths: dict, seed: int, num_train: int, num_test: int, world: str = "default") -> dict:
    """Render the images and write the two splits and the registry. Returns {split: rows}."""
    shutil.rmtree(paths["images"], ignore_errors=True)  # no stale images from an earlier build
    os.makedirs(paths["images"])
    splits = {}
    for split, count in (("train", num_train), ("test", num_test)):
        rows = []
        for row, image in make_rows(count, seed, split, WORLDS[world]):
            if image is not None:
                image.save(os.path.join(paths["images"], row["path"]))
            rows.append(row)
        with open(paths[split], "w") as f:
            json.dump(rows, f, indent=1)
        splits[split] = rows
    registry = {
        f"tiny_{split}": {"file_path": os.path.basename(paths[split]), "image_base_path": "images", "columns": COLUMNS}
        for split in ("train", "test")
    }
    with open(paths["registry"], "w") as f:
        json.dump(registry, f, indent=1)
    return splits


def is_built(paths: dict, build_args: dict) -> bool:
    needed = [os.path.join(paths["model"], "config.json"), paths["train"], paths["test"], paths["registry"]]
    if not all(os.path.isfile(path) for path in needed + [paths["build_args"]]):
        return False
    with open(paths["build_args"]) as f:
        return json.load(f) == build_args


def build(out_dir: str, seed: int = 0, num_train: int = 2000, num_test: int = 200, force: bool = False,
          world: str = "default") -> dict:
    """Build (or find already built) the tiny assets under `out_dir`; returns their paths."""
    if num_train < 1 or num_test < 1:
        raise InputError(f"--num-train {num_train} / --num-test {num_test}: both must be at least 1")
    paths = asset_paths(out_dir)
    build_args = {"seed": seed, "num_train": num_train, "num_test": num_test, "world": world}
    if not force and is_built(paths, build_args):
        return paths
    if os.path.exists(paths["build_args"]):
        os.remove(paths["build_args"])  # an interrupted rebuild must not look finished
    splits = write_data(paths, seed, num_train, num_test, world)
    corpus = task_texts(splits["train"] + splits["test"])
    build_tiny_model(paths["model"], corpus, seed=seed, fixed_texts=fixed_prompt_texts())
    with open(paths["build_args"], "w") as f:
        json.dump(build_args, f)
    return paths


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-test", type=int, default=200)
    parser.add_argument("--world", choices=list(WORLDS), default="default",
                        help="shortcut: demo/shortcut_tasks.py's families, whose shortcut breaks on tiny_test")
    parser.add_argument("--force", action="store_true", help="rebuild even when the assets exist")
    return parser.parse_args(argv)


@exit_on_input_error
def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    paths = asset_paths(args.out)
    build_args = {"seed": args.seed, "num_train": args.num_train, "num_test": args.num_test, "world": args.world}
    already = not args.force and is_built(paths, build_args)
    build(args.out, force=args.force, **build_args)
    if already:
        print(f"tiny assets already built in {args.out} (use --force to rebuild)")
        return
    print(f"wrote {args.num_train} train and {args.num_test} test rows: {paths['train']}, {paths['test']}")
    print(f"wrote images to {paths['images']} and the registry {paths['registry']} (tiny_train, tiny_test)")
    print(f"wrote the tiny Qwen2.5-VL to {paths['model']} ({_folder_megabytes(paths['model']):.1f} MB)"
          f" in {time.time() - start:.1f} s")


def _folder_megabytes(folder: str) -> float:
    return sum(entry.stat().st_size for entry in os.scandir(folder) if entry.is_file()) / 1e6


if __name__ == "__main__":
    main()
