"""Issue 20, item 5: which judge should the tiny pipeline train by default? Its judge today is step 1 on synthetic
traces (demo/trm_traces.py); the paper's recipe labels the policy's own GRPO rollouts (experiments/annotated_trm.py).
Per seed, both judges are scored by step 1's evaluate.py on the same held-out policy samples, labelled by the oracle.

    python experiments/default_judge.py            # 3 seeds (about an hour on 2 idle cores), then the table
    python experiments/default_judge.py --report-only

Stages per seed k (OUT/seed<k>/, each skipped when done; run the command again to continue):
    pipeline        train.py --steps 1 --seed k in pipeline/: the tiny world, the warm start, the synthetic-trace
                    judge (pipeline/step1/)
    source_run, labels, step1_trained   annotated_trm.py's stages on that world: a 40-step GRPO run of the warm start
                    (seed 100 + k), its rollouts labelled by the oracle through annotate.py, the judge trained on them
    eval_synthetic  evaluate.py of pipeline/step1/final on the held-out labels (synthetic_eval/metrics.json)

Decision rule (fixed before the first run): the annotated judge becomes the pipeline's default if its Spearman with
the oracle on the held-out policy samples is higher than the synthetic judge's in every seed and its mean MAE is lower;
otherwise the default stays. The report gives both judges' MAE (and a constant's: the mean of its training labels),
Spearman and pairwise accuracy per seed.
"""
import argparse
import json
import os
import statistics
import sys

from sophiavl.demo.report import read_json, read_jsonl
from sophiavl.utils.pipeline import PYTHON, Pipeline, run_stages

if not __package__:  # run as a script (`python experiments/default_judge.py`)
    from sophiavl.utils.stage import stage_package
    __package__ = stage_package(__file__)

from .annotated_trm import agreement, constant_mae, oracle_labels, source_run, train_trm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEASURES = ("mae", "constant_mae", "spearman", "pairwise_accuracy")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="outputs/default_judge")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--source-steps", type=int, default=40, help="steps of the GRPO run whose rollouts are labelled")
    p.add_argument("--pipeline-extra", default="", help="extra flags for train.py (the CI test shrinks the world)")
    p.add_argument("--step1-extra", default="", help="extra flags for both judges' step 1")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.source_steps < 1:
        p.error("--seeds and --source-steps must be >= 1")
    # what annotated_trm.oracle_labels and utils.pipeline read
    args.every_steps, args.heldout_fraction, args.heldout_max = 1, 0.15, 600
    args.force, args.deployment_type = False, "tiny"
    return args


def seed_pipeline(args, seed: int) -> Pipeline:
    return Pipeline(argparse.Namespace(**{**vars(args), "output_dir": os.path.join(args.output_dir, f"seed{seed}")}),
                    REPO)


def run_seed(args, seed: int) -> None:
    pipeline = seed_pipeline(args, seed)
    out = pipeline.path
    world = out("pipeline")  # train.py's own output folder (its stage times apart from these)
    pipeline.run("pipeline", [PYTHON, "train.py", "--output-dir", world, "--steps", "1", "--seed", str(seed),
                              "--step1-extra", args.step1_extra, *args.pipeline_extra.split()],
                 done_when=os.path.join(world, "step1", "eval", "metrics.json"))
    assets, policy = os.path.join(world, "assets"), os.path.join(world, "policy_init")
    registry = os.path.join(assets, "data", "dataset_info.json")
    run = source_run(pipeline, policy, registry, args.source_steps, 100 + seed)
    labels = oracle_labels(pipeline, run, registry, args)
    train_trm(pipeline, "trained", labels, assets, policy, args.step1_extra.split())
    pipeline.run("eval_synthetic", [PYTHON, "step1_reward_model/evaluate.py", "--data", labels["heldout"],
                                    "--model-path", os.path.join(world, "step1", "final"),
                                    "--output-dir", out("synthetic_eval"), "--dtype", "float32"],
                 done_when=out("synthetic_eval", "metrics.json"))


def judges_of(folder: str) -> dict | None:
    """{"synthetic": ..., "annotated": ...} agreement figures of one finished seed, None before it finished."""
    heldout = os.path.join(folder, "rollouts", "heldout_labels.jsonl")
    if not all(os.path.exists(os.path.join(folder, *p)) for p in (("synthetic_eval", "metrics.json"),
                                                                   ("trm_trained", "eval", "metrics.json"))):
        return None
    synthetic = read_json(os.path.join(folder, "synthetic_eval", "metrics.json"))
    scored = [row for row in read_jsonl(heldout) if row["status"] == "scored"]
    synthetic["constant_mae"] = constant_mae(read_jsonl(os.path.join(folder, "pipeline", "step1", "trm_train.jsonl")),
                                             scored)
    return {"synthetic": synthetic, "annotated": agreement(os.path.join(folder, "trm_trained"), heldout)}


def report(args) -> dict:
    seeds = {k: judges_of(os.path.join(args.output_dir, f"seed{k}")) for k in range(args.seeds)}
    done = {k: judges for k, judges in seeds.items() if judges}
    print(f"{len(done)} of {args.seeds} seeds finished; figures on the held-out policy samples (oracle labels)")
    print(f"{'seed':<6}{'judge':<11}" + "".join(f"{m:>19}" for m in MEASURES))
    for k, judges in done.items():
        for name, figures in judges.items():
            print(f"{k:<6}{name:<11}" + "".join(f"{figures[m]:>19.3f}" for m in MEASURES))
    verdict = None
    if len(done) == args.seeds:
        better = all(j["annotated"]["spearman"] > j["synthetic"]["spearman"] for j in done.values())
        mae = {name: statistics.fmean(j[name]["mae"] for j in done.values()) for name in ("synthetic", "annotated")}
        verdict = "annotated" if better and mae["annotated"] < mae["synthetic"] else "synthetic"
        print(f"decision (docstring's rule): the pipeline's default judge is the {verdict} one")
    summary = {"seeds": done, "default": verdict}
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    if not args.report_only:
        code = run_stages(lambda: [run_seed(args, k) for k in range(args.seeds)])
        if code:
            return code
    report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
