"""The paper's judge recipe in the tiny world: label a GRPO run's own rollouts with the strong judge (here the oracle,
demo/oracle_server.py) through step 1's annotate.py, balance them, fine-tune the TRM on them; then measure how well
the TRM agrees with the oracle on policy samples of prompts it never saw.

    python experiments/annotated_trm.py --output-dir OUT --policy OUT/policy_init --assets OUT/assets

Stages, each skipped when its output exists (run the command again to continue after a crash or Ctrl-C):
    source_run        step 2's GRPO baseline with --log-completions (--source-seed, --source-steps)
    rollouts          the completions of every --every-steps'th step, as annotate.py's input rows; the completions of
                      --heldout-fraction of the prompts (distinct ones, at most --heldout-max) are held out
    labels            annotate.py, unchanged, against the oracle server (started in this process), then split
    step1_<condition> the training labels relabelled (true, inverted = 1 - s: a hacked judge, shuffled: the untrained-
                      TRM stand-in), then step 1's tiny launcher: balance.py, main.py, evaluate.py on the held-out
                      samples with the oracle's true labels (trm_<condition>/eval/metrics.json)
experiments/shortcut_ablations.py runs these stages inside its own pipeline.
"""
import argparse
import glob
import json
import os
import random
import sys

from sophiavl.demo.oracle_server import OracleServer, load_index
from sophiavl.demo.report import read_json, read_jsonl
from sophiavl.demo.trm_traces import relabel
from sophiavl.utils.data import load_rows
from sophiavl.utils.pipeline import PYTHON, Pipeline, run_stages
from sophiavl.utils.prompts import format_question

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONDITIONS = {"trained": "true", "hacked": "inverted", "untrained": "shuffled"}


def write_jsonl(path: str, rows: list[dict]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(tmp, path)


def is_held_out(problem_id: str, fraction: float) -> bool:
    return random.Random(f"heldout-{problem_id}").random() < fraction  # by prompt, the same in every run


def rollout_rows(run_dir: str, registry: str, folder: str, every_steps: int = 1, heldout_fraction: float = 0.15,
                 heldout_max: int = 600) -> tuple[list[dict], list[dict]]:
    """annotate.py input rows (id, question, response, images relative to `folder`, problem_id, step, outcome) from a
    step-2 run's completion logs: (training rows, held-out rows). Held out: every completion of the prompts that
    is_held_out picks, each distinct response once, at most `heldout_max` of them drawn evenly across the run."""
    tasks = {row["id"]: row for row in load_rows("tiny_train", registry)}
    train, held_out, seen = [], [], set()
    for file in sorted(glob.glob(os.path.join(run_dir, "completions", "rank*.jsonl"))):
        for group in read_jsonl(file):
            if group["step"] % every_steps:
                continue
            task = tasks[group["problem_id"]]
            base = {"question": format_question(task["prompt"], task["problem_type"], task["options"]),
                    "images": [os.path.relpath(ref["path"], folder) for ref in task["images"]],
                    "problem_id": task["id"], "step": group["step"]}
            for k, (text, outcome) in enumerate(zip(group["completions"], group["outcome"])):
                row = {"id": f"{task['id']}@{group['step']}#{k}", **base, "response": text, "outcome": outcome}
                if not is_held_out(task["id"], heldout_fraction):
                    train.append(row)
                elif (task["id"], text) not in seen:
                    seen.add((task["id"], text))
                    held_out.append(row)
    held_out.sort(key=lambda row: (row["step"], row["id"]))
    if len(held_out) > heldout_max:  # evenly across steps: every k-th in step order
        held_out = [held_out[i * len(held_out) // heldout_max] for i in range(heldout_max)]
    return train, held_out


def relocated(rows: list[dict], source: str, target: str) -> list[dict]:
    """The rows with their relative image paths rewritten from folder `source` to folder `target`."""
    return [{**row, "images": [os.path.relpath(os.path.join(source, p), target) for p in row["images"]]} for row in rows]


def constant_mae(train_labels: list[dict], held_out: list[dict]) -> float:
    """MAE on the held-out labels of the best constant guess a judge could learn from its training labels: their mean."""
    mean = sum(row["score"] for row in train_labels) / len(train_labels)
    return sum(abs(row["score"] - mean) for row in held_out) / len(held_out)


def agreement(trm_dir: str, held_out_labels: str) -> dict:
    """The TRM's agreement with the oracle on the held-out policy samples: evaluate.py's MAE, Spearman and pairwise
    accuracy (eval/metrics.json), next to the MAE of a constant (the mean of the balanced labels it trained on)."""
    metrics = read_json(os.path.join(trm_dir, "eval", "metrics.json"))
    trained_on = read_jsonl(os.path.join(trm_dir, "trm_train.jsonl"))
    held_out = [row for row in read_jsonl(held_out_labels) if row["status"] == "scored"]
    return {"rows": metrics["rows"], "mae": metrics["mae"], "constant_mae": constant_mae(trained_on, held_out),
            "spearman": metrics["spearman"], "pairwise_accuracy": metrics["pairwise_accuracy"],
            "pairs": metrics["pairs"], "parse_failure_rate": metrics["parse_failure_rate"],
            "train_rows": len(trained_on)}


def source_run(pipeline: Pipeline, policy: str, registry: str, steps: int, seed: int, extra=()) -> str:
    out = pipeline.path("source_run")
    pipeline.run("source_run", ["bash", "step2_trust_grpo/training_scripts/run_tiny_cpu.sh", out, policy, registry,
                                "none", "--seed", str(seed), "--max-steps", str(steps), "--save-every", str(steps),
                                "--eval-every", "0", "--log-completions", "--resume", *extra],
                 done_when=os.path.join(out, "final", "config.json"))
    return out


def oracle_labels(pipeline: Pipeline, run_dir: str, registry: str, args) -> dict:
    """rollouts/{train,heldout}_labels.jsonl: the run's rollouts labelled by annotate.py through the oracle server."""
    folder = pipeline.path("rollouts")
    os.makedirs(folder, exist_ok=True)
    rollouts, labelled = os.path.join(folder, "rollouts.jsonl"), os.path.join(folder, "labels.jsonl")
    if not os.path.exists(rollouts):
        train, held_out = rollout_rows(run_dir, registry, folder, args.every_steps, args.heldout_fraction,
                                       args.heldout_max)
        write_jsonl(rollouts, [{**row, "split": "train"} for row in train] +
                    [{**row, "split": "heldout"} for row in held_out])
        print(f"[rollouts] {len(train)} training and {len(held_out)} held-out completions of {run_dir}", flush=True)
    if not os.path.exists(labelled):
        with OracleServer(load_index(registry, "tiny_train")) as oracle:  # annotate.py resumes its .partial file
            pipeline.run("labels", [PYTHON, "step1_reward_model/annotate.py", "--input", rollouts, "--output",
                                    labelled + ".partial", "--judge-url", oracle.url, "--judge-model", "oracle"])
        os.replace(labelled + ".partial", labelled)  # the rename marks it complete
    labels = {part: os.path.join(folder, f"{part}_labels.jsonl") for part in ("train", "heldout")}
    if not all(os.path.exists(path) for path in labels.values()):
        rows = read_jsonl(labelled)
        for part, path in labels.items():
            write_jsonl(path, [row for row in rows if row["split"] == part])
    return labels


def condition_labels(labels: dict, condition: str, out: str) -> str:
    """out/labels.jsonl: the oracle's scored training labels as the condition has them (true, 1 - s, or shuffled)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "labels.jsonl")
    if not os.path.exists(path):
        rows = [row for row in read_jsonl(labels["train"]) if row["status"] == "scored"]
        write_jsonl(path, relocated(relabel(rows, CONDITIONS[condition], seed=0), os.path.dirname(labels["train"]), out))
    return path


def train_trm(pipeline: Pipeline, condition: str, labels: dict, assets: str, policy: str, step1_extra=()) -> str:
    """Step 1 on the condition's relabelling of the oracle's training labels; evaluated on the held-out samples'
    true labels. Returns the judge's directory."""
    out = pipeline.path(f"trm_{condition}")
    train_file = condition_labels(labels, condition, out)
    pipeline.run(f"step1_{condition}", ["bash", "step1_reward_model/training_scripts/train_tiny_cpu.sh", out, assets,
                                        policy, *step1_extra],
                 done_when=os.path.join(out, "eval", "metrics.json"),
                 env={"TRM_TRAIN_LABELS": train_file, "TRM_EVAL_LABELS": labels["heldout"]})
    return os.path.join(out, "final")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--policy", required=True, help="the warm-started policy (the source run's start and the TRM's base)")
    p.add_argument("--assets", required=True, help="a demo/build_tiny_assets.py folder (its data/dataset_info.json)")
    p.add_argument("--conditions", nargs="+", choices=list(CONDITIONS), default=["trained"])
    add_arguments(p)
    args = p.parse_args(argv)
    check_arguments(p, args)
    registry = os.path.join(args.assets, "data", "dataset_info.json")
    if not os.path.isfile(registry) or not os.path.isfile(os.path.join(args.policy, "config.json")):
        p.error(f"--assets needs {registry} and --policy a model folder (config.json)")
    args.force, args.deployment_type = False, "tiny"  # what utils.pipeline reads
    return args


def add_arguments(p) -> None:
    g = p.add_argument_group("the annotated rollouts")
    g.add_argument("--source-steps", type=int, default=40, help="steps of the GRPO run whose rollouts are labelled")
    g.add_argument("--source-seed", type=int, default=100, help="its seed (not one of the arms' seeds)")
    g.add_argument("--every-steps", type=int, default=1, help="label the completions of every k-th step")
    g.add_argument("--heldout-fraction", type=float, default=0.15, help="prompts whose rollouts are held out")
    g.add_argument("--heldout-max", type=int, default=600, help="most distinct held-out completions evaluated")
    g.add_argument("--step1-extra", default="", help="extra flags for step 1's main.py, e.g. '--max-steps 20'")


def check_arguments(p, args) -> None:
    if min(args.source_steps, args.every_steps, args.heldout_max) < 1 or not 0 < args.heldout_fraction < 1:
        p.error("--source-steps, --every-steps and --heldout-max must be >= 1, --heldout-fraction in (0, 1)")


def main(argv=None) -> int:
    args = parse_args(argv)
    pipeline = Pipeline(args, REPO)
    registry = os.path.join(os.path.abspath(args.assets), "data", "dataset_info.json")

    def stages():
        run = source_run(pipeline, os.path.abspath(args.policy), registry, args.source_steps, args.source_seed)
        labels = oracle_labels(pipeline, run, registry, args)
        for condition in args.conditions:
            train_trm(pipeline, condition, labels, os.path.abspath(args.assets), os.path.abspath(args.policy),
                      args.step1_extra.split())
            print(f"{condition}: {json.dumps(agreement(pipeline.path(f'trm_{condition}'), labels['heldout']))}")

    return run_stages(stages)


if __name__ == "__main__":
    sys.exit(main())
